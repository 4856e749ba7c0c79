"""Train, watch, sample and chat from a Jupyter notebook (``pip install 'smallm[notebook]'``).

    from smallm.notebook import Dashboard, GenerationPanel, ChatPanel
    dash = Dashboard(preset="tiny", max_steps=300, out="runs/nb")   # the settings of smallm-train
    dash                        # shows it: kind, Plan, Start, Stop, Resume, the live loss plot and progress
    dash.start(); dash.wait()   # or press the buttons
    GenerationPanel("runs/nb")  # prompt box, sampling sliders, streamed output
    sft = Dashboard(kind="sft", base="runs/nb", data="chats.jsonl", out="runs/sft", lora_r=16)  # smallm-sft's
    sft.plan()                  # memory and time before anything trains (the Plan button)
    sft.start(); sft.wait()     # kind="dpo" and kind="rm" plot their preference accuracy and margin too
    sft.export()                # smallm-export, to runs/sft-hf (the Export button)
    sft.chat()                  # a ChatPanel on the result (the Chat button)
    ChatPanel("runs/sft")       # a conversation (ChatML); /reset starts over
    Dashboard.of_run("runs/nb")   # an earlier run of any kind: its curves and settings, ready to resume

The dashboard drives the same trainer as the console scripts (``smallm-train``, ``smallm-sft``, ``smallm-dpo``,
``smallm-rm``) in a background thread (:class:`~smallm.notebook.session.TrainingSession`), so the notebook stays
usable meanwhile and a stopped run resumes from the command line as well.
"""

from __future__ import annotations

try:
    import ipywidgets  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("smallm.notebook needs ipywidgets: pip install 'smallm[notebook]'") from e

from smallm.notebook.dashboard import Dashboard
from smallm.notebook.form import SettingsForm
from smallm.notebook.kinds import DPO_FIELDS, FINETUNE_FIELDS, KINDS, REWARD_FIELDS, TRAIN_FIELDS, RunKind
from smallm.notebook.panels import ChatPanel, GenerationPanel, SamplingControls, open_model
from smallm.notebook.session import Progress, TrainingSession, error_message

__all__ = [
    "DPO_FIELDS", "FINETUNE_FIELDS", "KINDS", "REWARD_FIELDS", "TRAIN_FIELDS", "ChatPanel", "Dashboard",
    "GenerationPanel", "Progress", "RunKind", "SamplingControls", "SettingsForm", "TrainingSession", "error_message",
    "open_model", "show_run",
]  # fmt: skip


def show_run(run: str) -> Dashboard:
    """The dashboard of an existing run directory: its loss curves and settings, ready to resume."""
    return Dashboard.of_run(run)
