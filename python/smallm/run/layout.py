"""A run directory: every name in it, what makes a directory a run, and how a run opens, locks and writes it.

``smallm-train --out RUN`` (and ``smallm-sft``, ``-dpo``, ``-rm``; ``smallm-import`` and ``smallm-merge``
write a run of one checkpoint) makes::

    RUN/config.json                 the run's resolved settings ({"train", "model", ...})
    RUN/metrics.jsonl               one JSON object per logged step and validation
    RUN/loss_curve.png              the curves of metrics.jsonl
    RUN/tokenizer.json ...          the tokenizer (smallm.text.tokenizer.TOKENIZER_FILES)
    RUN/checkpoints/step_00000300/  model.safetensors, training_state.pt, config.json
    RUN/checkpoints/latest, best    one-line files naming a step directory
    RUN/adapter/                    a LoRA run's adapter in peft's layout
    RUN/tensorboard/                with --tensorboard
    RUN/evals/step_00000300.json    lm-eval task results of that checkpoint (smallm-eval --tasks)

:data:`RUN` is this layout as a :class:`~smallm.files.destination.Artifact`: the rule every writer of a
destination follows (:mod:`smallm.files.destination`) applies to runs through it. :class:`RunDirectory`
is a run's directory while a run trains in it:

* a new run claims the directory by that rule (``--force`` deletes the previous run's entries only; a
  directory holding anything else, a shard directory's tokenizer above all, is refused); ``--resume``
  claims it as the run to continue;
* the process that writes (rank 0) holds the directory's lock from the first write to the end, so a second
  run, an export or an import on it stops at once naming the first;
* on start, the temporaries of writes a killed run left half done are deleted; on resume,
  ``metrics.jsonl`` loses the lines of the steps after the checkpoint, which the resumed run logs again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from smallm.files.atomic import DEBRIS, delete_entry, read_appended, write_json_atomic, write_text_atomic
from smallm.files.destination import Artifact, Destination, claim
from smallm.text.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES

__all__ = [
    "ADAPTER_DIR", "BEST", "CHECKPOINTS_DIR", "CONFIG_FILE", "EVALS_DIR", "LATEST", "METRICS_FILE", "PLOT_FILE", "RUN",
    "RUN_ENTRIES", "STATE_FILE", "TENSORBOARD_DIR", "WEIGHTS_FILE", "RunDirectory", "held_run", "is_run_config",
    "read_json", "read_metrics", "trim_metrics", "write_run_config",
]  # fmt: skip

CONFIG_FILE = "config.json"
"""The run's settings; a checkpoint holds the settings it was saved with under the same name."""
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
TENSORBOARD_DIR = "tensorboard"
EVALS_DIR = "evals"
WEIGHTS_FILE = "model.safetensors"
"""A checkpoint's weights, under Hugging Face's names."""
STATE_FILE = "training_state.pt"
"""A checkpoint's optimizer, schedule, data position and RNG states (what ``--resume`` needs)."""
LATEST, BEST = "latest", "best"
"""The pointer files in ``checkpoints/``."""

RUN_ENTRIES = (
    CONFIG_FILE, METRICS_FILE, PLOT_FILE, *TOKENIZER_FILES, CHECKPOINTS_DIR, ADAPTER_DIR, TENSORBOARD_DIR, EVALS_DIR,
)  # fmt: skip
"""What a run writes in its directory (and all that ``--force`` deletes there)."""


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` is smallm's (a ``model`` section) rather than transformers'."""
    return isinstance(config, dict) and isinstance(config.get("model"), dict) and "architectures" not in config


def held_run(out: Path) -> str:
    """What shows that ``out`` holds a run, for a message (empty when it does not): its smallm
    ``config.json``, ``metrics.jsonl``, and its checkpoints."""
    found = [CONFIG_FILE] if is_run_config(read_json(out / CONFIG_FILE)) else []
    if (out / METRICS_FILE).is_file():
        found.append(METRICS_FILE)
    checkpoints = out / CHECKPOINTS_DIR
    steps = sorted(checkpoints.glob("step_*")) if checkpoints.is_dir() else []
    if steps:
        found.append(f"checkpoints up to {steps[-1].name}")
    elif checkpoints.is_dir():
        found.append(CHECKPOINTS_DIR)
    return ", ".join(found)


RUN = Artifact("a run", lambda path: bool(held_run(path)), RUN_ENTRIES, describe=held_run)
"""A run directory as an output, for :func:`smallm.files.destination.claim`."""


class RunDirectory:
    """The directory ``out`` of a run: :meth:`check` early, :meth:`open` before the first write, :meth:`close`
    at the end. ``inputs``: what the run reads (its data, the weights it starts from), which ``out`` may
    neither be, hold nor lie inside. Only the ``writer`` (rank 0) checks, locks and writes."""

    def __init__(self, out: Path, inputs: Iterable[str | Path | None] = (), *, command: str = "smallm-train",
                 writer: bool = True) -> None:  # fmt: skip
        self.out, self.inputs, self.command, self.writer = out, list(inputs), command, writer
        self.destination: Destination | None = None

    def claim(self, *, resume: bool, force: bool) -> Destination:
        """The run's directory claimed for writing (see the module docstring); locked until released."""
        steps = list((self.out / CHECKPOINTS_DIR).glob("step_*")) if (self.out / CHECKPOINTS_DIR).is_dir() else []
        advice = "continue it with --resume, " if steps else "it stopped before its first checkpoint, so "
        return claim(
            self.out, RUN, force=force, command=self.command, inputs=self.inputs, continuing=resume, advice=advice,
        )  # fmt: skip

    def check(self, *, resume: bool, force: bool) -> None:
        """Fails early, before a model is built, where :meth:`open` would."""
        if self.writer:
            self.claim(resume=resume, force=force).release()

    def open(self, *, resume: bool, force: bool) -> None:
        """Claims and locks the directory (checking it again: another run may have started since), deletes
        a previous run under ``force`` and the temporaries of killed writes."""
        if not self.writer:
            return
        self.destination = self.claim(resume=resume, force=force)
        try:
            self.destination.clear()
            checkpoints = self.out / CHECKPOINTS_DIR
            for entry in checkpoints.iterdir() if checkpoints.is_dir() else ():
                if DEBRIS.fullmatch(entry.name):
                    delete_entry(entry)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.destination is not None:
            self.destination.release()
            self.destination = None


def write_run_config(out: Path, config: dict[str, Any]) -> None:
    """Writes ``out/config.json`` atomically."""
    write_json_atomic(out / CONFIG_FILE, config)


def has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_FILE).is_file()


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl`` in order (none when it is missing). A last line cut short by a
    kill (an append is synced line by line, so only the last can be torn) is left out; any other line that
    is not a JSON object raises ``ValueError`` naming the file and the line."""
    path = out / METRICS_FILE
    lines, _ = read_appended(path)
    for number, record in lines:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a metrics record (a JSON object per line)")
    return [record for _, record in lines]


def trim_metrics(out: Path, step: int) -> int:
    """Drops the lines of ``out/metrics.jsonl`` logged after ``step`` (a resume from that step logs them
    again) and a last line cut short by a kill; returns how many were dropped."""
    path = out / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if _logged_by(line, step)]
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def _logged_by(line: str, step: int) -> bool:
    """Whether ``line`` is a whole record of a step up to ``step``."""
    try:
        return int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
        return False
