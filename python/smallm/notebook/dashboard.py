"""The training dashboard: a kind of run, its settings, its plan, Start / Stop / Resume, the run's curves and
progress, live, and what to do with the result.

The kinds are pretraining, SFT, DPO and a reward model (:data:`~smallm.notebook.kinds.KINDS`); the settings
are the fields of the kind's configuration dataclass (:class:`~smallm.train.config.TrainConfig` for
pretraining, :class:`~smallm.train.config.FinetuneConfig` and its subclasses for the others), each shown with
its default and help, and checked by the same :func:`~smallm.train.config.build_config` as the command line,
so a bad value gets the message the console script gives. A fine-tuning run's ``base`` is a run directory,
a checkpoint or a Hub id, resolved at Start as ``smallm-sft`` resolves its CKPT. Plan shows the memory and
time plan of the settings (:func:`smallm.train.plan.plan_run`) before anything trains. Start trains in the
background (:class:`~smallm.notebook.session.TrainingSession`); the plot (with the preference accuracy and
margin for DPO and reward models), the progress bar (tokens/s, learning rate, MFU, time left), the latest
sample and the run's console lines follow as metrics arrive. Stop finishes the step under way and writes a
checkpoint; Resume continues it (as ``--resume`` would, with the run's own settings for those not changed).
Once there is a result, Export writes it as ``smallm-export`` does, and Chat (Generate for pretraining)
opens a panel on it. Opened on an existing run directory (:meth:`Dashboard.of_run`), it shows the curves of
its ``metrics.jsonl`` with its kind and settings, ready to resume.

The widgets carry CSS classes (``smallm-dashboard``, ``smallm-kind``, ``smallm-plot``, ``smallm-progress``,
``smallm-status``, ``smallm-sample``, ``smallm-error``, ``smallm-plan``, ``smallm-plan-text``,
``smallm-start``, ``smallm-stop``, ``smallm-resume``, ``smallm-export``, ``smallm-export-path``,
``smallm-try``, ``smallm-result``) for styling and for tests that drive a browser.
"""

from __future__ import annotations

import dataclasses
import html
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as w

from smallm.interop.export import export_run
from smallm.notebook.form import SettingsForm, action_button
from smallm.notebook.kinds import KINDS, RunKind, kind_named, ready_to_run, saved_settings
from smallm.notebook.panels import ChatPanel, GenerationPanel
from smallm.notebook.session import TrainingSession, console_of_this_thread, error_message
from smallm.run.checkpoint import latest_checkpoint
from smallm.run.layout import read_metrics
from smallm.train.config import RunConfig
from smallm.train.metrics import LossCurves, loss_figure
from smallm.train.plan import plan_run

__all__ = ["Dashboard"]

PLOT_EVERY_S = 0.5
"""The plot is redrawn at most this often while metrics arrive (and always at the end)."""
PLOT_SIZE = (6.4, 3.4)
"""Inches of each of the plot's panels (the loss; a preference run's accuracy and margin below it)."""
NOT_CARRIED = frozenset({"out", "data", "val_data"})
"""Settings a change of kind leaves behind: another kind of run writes elsewhere and reads another format."""


class Dashboard(w.VBox):
    """A kind of run, its settings, Plan, Start / Stop / Resume, the live view of the run and its result.
    ``kind``: ``pretrain`` (default), ``sft``, ``dpo`` or ``rm``; ``settings``: values for the form
    (``Dashboard(preset="tiny", max_steps=200)``, ``Dashboard(kind="sft", base="runs/nb", data="chats.jsonl")``:
    ``base`` is the fine-tuning's ``init_from``); ``fields``: which settings it shows."""

    def __init__(self, *, kind: str = "pretrain", fields: Sequence[str] | None = None, **settings: Any) -> None:
        if "base" in settings:
            settings["init_from"] = settings.pop("base")
        self.kind = kind_named(kind)
        self.result_kind = self.kind  # the kind of the run the result buttons act on
        self.form = self._new_form(self.kind, settings, fields)
        self.session: TrainingSession | None = None
        self.kind_choice = w.Dropdown(options=[(k.title, k.name) for k in KINDS.values()], value=self.kind.name,
                                      description="kind", style={"description_width": "40px"})  # fmt: skip
        self.kind_choice.observe(lambda change: self.set_kind(change["new"]), names="value")
        self.plan_button = action_button("Plan", "", "smallm-plan", "memory and time of these settings, before Start")
        self.start_button = action_button("Start", "success", "smallm-start", "train a new run in --out")
        self.stop_button = action_button("Stop", "warning", "smallm-stop", "stop after this step, with a checkpoint")
        self.resume_button = action_button("Resume", "info", "smallm-resume", "continue the run in --out")
        self.export_button = action_button("Export", "", "smallm-export", "write the run as a transformers folder")
        self.try_button = action_button("Chat", "primary", "smallm-try", "talk to the run's model")
        self.plan_button.on_click(lambda _: self.plan())
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.resume())
        self.export_button.on_click(lambda _: self.export())
        self.try_button.on_click(lambda _: self._show_panel())
        self.export_to = w.Text(value="", placeholder="OUT-hf", description="to", style={"description_width": "24px"})
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="100%"))
        self.status, self.error, self.plan_text = w.HTML("not started"), w.HTML(""), w.HTML("")
        self.plot = w.Image(format="png", layout=w.Layout(width="640px"))
        self.sample, self.result_message, self.panel_area = w.HTML(""), w.HTML(""), w.VBox([])
        self.console = w.Textarea(value="", disabled=True, layout=w.Layout(width="100%", height="110px"))
        for widget, name in ((self.progress, "smallm-progress"), (self.status, "smallm-status"),
                             (self.error, "smallm-error"), (self.plot, "smallm-plot"),
                             (self.kind_choice, "smallm-kind"), (self.sample, "smallm-sample"),
                             (self.console, "smallm-log"),
                             (self.plan_text, "smallm-plan-text"), (self.export_to, "smallm-export-path"),
                             (self.result_message, "smallm-result")):  # fmt: skip
            widget.add_class(name)
        self._drawn_at = 0.0
        self._lock = threading.Lock()
        self.result_row = w.HBox([self.export_button, self.export_to, self.try_button], layout=w.Layout(display="none"))
        buttons = w.HBox([self.plan_button, self.start_button, self.stop_button, self.resume_button])
        super().__init__([
            w.HBox([w.HTML("<b>smallm training</b>"), self.kind_choice]), self.form.box, buttons, self.error,
            self.plan_text, self.progress, self.status, self.plot, w.HTML("<b>latest sample</b>"), self.sample,
            self.result_row, self.result_message, self.panel_area, w.HTML("<b>console</b>"), self.console,
        ])  # fmt: skip
        self.add_class("smallm-dashboard")
        self._buttons("idle")
        self._show_existing_run()

    @classmethod
    def of_run(cls, run: str | Path, **settings: Any) -> Dashboard:
        """A dashboard on the run directory ``run`` (any kind): its kind and settings (from ``config.json``)
        and curves (from ``metrics.jsonl``), ready to resume; ``settings`` change some of them first."""
        kind, values = saved_settings(run)
        return cls(kind=kind.name, **{**values, "out": str(run), **settings})

    def set_kind(self, name: str) -> None:
        """Shows the form of another kind of run (what the kind dropdown does), keeping the settings given so
        far that it has, but where the run goes and what it reads."""
        kind = kind_named(name)
        if kind == self.kind:
            return
        if self._busy():
            self.kind_choice.value = self.kind.name
            return
        try:
            chosen = self.form.chosen()
        except ValueError:  # a value the old form cannot read is not worth carrying
            chosen = {}
        known = {f.name for f in dataclasses.fields(kind.config_class)} - NOT_CARRIED
        carried = {k: v for k, v in chosen.items() if k in known}
        if "init_from" in known and self.session is not None and self.session.state == "finished":
            carried["init_from"] = self.session.cfg.out  # fine-tune the run just trained
        old_box, self.kind = self.form.box, kind
        self.form = self._new_form(kind, carried)
        self.children = tuple(self.form.box if child is old_box else child for child in self.children)
        self.kind_choice.value = kind.name
        self._show_error("")

    # ----- the buttons --------------------------------------------------------------------------

    def plan(self) -> str | None:
        """Shows and returns the memory and time plan of the form's settings (:func:`smallm.train.plan.plan_run`);
        None when a setting is wrong (the message is shown)."""
        if self._busy():
            return None
        printed: list[str] = []  # what the warm-up steps print goes to the console box, not the cell
        try:
            with console_of_this_thread(printed.append):
                plan = plan_run(self._ready_config())
            text = plan.text()
        except Exception as e:  # the command line's message, in the widget
            self._show_error(error_message(e))
            return None
        finally:
            self.console.value = "\n".join(printed[-200:])
        self._show_error("")
        color = "#b00020" if plan.fits is False else "inherit"  # red: it would not fit
        self.plan_text.value = f"<pre style='white-space: pre-wrap; color: {color}'>{html.escape(text)}</pre>"
        return text

    def start(self, **overrides: Any) -> TrainingSession | None:
        """Starts a new run with the form's settings (``overrides`` on top); None when a setting is wrong
        (the message is shown)."""
        return self._launch(resume=False, **overrides)

    def resume(self, **overrides: Any) -> TrainingSession | None:
        """Continues the run in the form's ``out`` from its latest checkpoint, with the run's own settings for
        those the form leaves at their defaults (as ``--resume``)."""
        return self._launch(resume=True, force=False, **overrides)

    def stop(self) -> None:
        """Stops the run after the step under way, with a checkpoint there."""
        if self.session is not None:
            self.session.stop()

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the run ends; returns its state (``finished``, ``stopped`` or ``failed``)."""
        return self.session.wait(timeout) if self.session is not None else "idle"

    def run_directory(self) -> Path:
        """The run the result buttons act on: the session's, else the form's ``out``."""
        return Path(self.session.cfg.out if self.session is not None else self.form.value("out"))

    def export(self, folder: str | Path | None = None) -> Path | None:
        """Writes the run's latest checkpoint as a transformers folder (a reward model as a sequence classifier,
        a LoRA run merged into its base) with :func:`~smallm.interop.export.export_run`, as ``smallm-export``:
        to ``folder``, else the export box's, else ``OUT-hf``; an earlier export there is replaced only with the
        form's ``force``. Returns the folder, or None with the message shown."""
        run = self.run_directory()
        target = Path(folder or self.export_to.value.strip() or f"{run}-hf")
        try:
            done = export_run(run, target, force=bool(self.form.value("force")))
        except Exception as e:  # smallm-export's message, in the widget
            self._show_error(error_message(e))
            return None
        self._show_error("")
        self.result_message.value = html.escape(f"wrote the {done.what} of {done.checkpoint} to {done.path}")
        return done.path

    def panel(self, **settings: Any) -> ChatPanel | GenerationPanel:
        """A panel on the run's model: a :class:`ChatPanel` for a fine-tuned run (SFT, DPO), a
        :class:`GenerationPanel` for pretraining; ``settings`` go to it (``device`` is the form's unless
        given). A reward model has none: its sample is the scores of a training pair."""
        kind = self.result_kind
        if not kind.panel:
            raise ValueError(f"a {kind.title} scores replies rather than writing them: its sample shows the scores "
                             "of a training pair")  # fmt: skip
        cls = ChatPanel if kind.panel == "chat" else GenerationPanel
        return cls(self.run_directory(), **{"device": self.form.value("device"), **settings})

    def chat(self, **settings: Any) -> ChatPanel:
        """A :class:`ChatPanel` on the fine-tuned run's model (SFT or DPO); ``settings`` go to it."""
        if self.result_kind.panel != "chat":
            raise ValueError(f"chat needs a run of sft or dpo, not of {self.result_kind.title}: try panel()")
        panel = self.panel(**settings)
        assert isinstance(panel, ChatPanel)
        return panel

    def _new_form(self, kind: RunKind, values: dict[str, Any], fields: Sequence[str] | None = None) -> SettingsForm:
        return SettingsForm(kind.config_class, fields or kind.fields, values, labels=kind.labels,
                            placeholders=kind.placeholders)  # fmt: skip

    def _ready_config(self, **overrides: Any) -> RunConfig:
        """The form's settings, checked, as the console script would train them (:func:`ready_to_run`)."""
        return ready_to_run(self.form.config(**overrides), set(self.form.chosen()) | set(overrides))

    def _busy(self) -> bool:
        """Whether a run is in progress (then said in the widget)."""
        if self.session is not None and self.session.running:
            self._show_error("a run is in progress: stop it first")
            return True
        return False

    def _launch(self, **overrides: Any) -> TrainingSession | None:
        if self._busy():
            return None
        try:
            cfg = self._ready_config(**overrides)
        except Exception as e:  # the command line's message, in the widget
            self._show_error(error_message(e))
            return None
        self._show_error("")
        self.console.value, self.result_message.value, self.panel_area.children = "", "", ()
        self.result_kind = self.kind
        self.session = TrainingSession(cfg, on_update=self._update)
        self.session.start()
        return self.session

    def _show_panel(self) -> None:
        try:
            self.panel_area.children = (self.panel(),)
        except Exception as e:  # the command line's message, in the widget
            self._show_error(error_message(e))

    # ----- the view -----------------------------------------------------------------------------

    def _update(self, session: TrainingSession, record: dict[str, Any] | None) -> None:
        """Called from the training thread: after each metrics line, sample and change of state."""
        with self._lock:
            done = session.state in ("stopped", "finished", "failed")
            p = session.progress
            self.progress.max, self.progress.value = max(p.max_steps, 1), min(p.step, max(p.max_steps, 1))
            self.status.value = (
                f"<code>{html.escape(session.state, quote=False)}</code> · {html.escape(p.line(), quote=False)}"
            )
            if session.sample is not None:
                self.sample.value = (
                    f"<pre style='white-space: pre-wrap'>{html.escape(session.sample, quote=False)}</pre>"
                )
            self.console.value = "\n".join(session.log[-200:])
            if session.error:
                self._show_error(session.error)
            now = time.monotonic()
            if (record is not None and now - self._drawn_at >= PLOT_EVERY_S) or done:
                self._draw(session.records)
                self._drawn_at = now
            self._buttons(session.state)

    def _draw(self, records: Sequence[dict[str, Any]]) -> None:
        curves = LossCurves.of(records)
        if curves.train or curves.val:
            self.plot.value = loss_figure(curves, size=PLOT_SIZE, dpi=100)

    def _show_existing_run(self) -> None:
        out = Path(str(self.form.value("out")))
        records = read_metrics(out) if str(out) else []
        if not records:
            return
        self._draw(records)
        last = max((r["step"] for r in records), default=0)
        self.status.value = f"<code>saved run</code> · {html.escape(str(out), quote=False)}, step {last}"
        self._buttons("saved" if latest_checkpoint(out) is not None else "idle")

    def _show_error(self, message: str) -> None:
        self.error.value = (
            ""
            if not message
            else f"<pre style='color: #b00020; white-space: pre-wrap'>{html.escape(message, quote=False)}</pre>"
        )

    def _buttons(self, state: str) -> None:
        busy = state in ("starting", "running", "stopping")
        self.start_button.disabled = busy
        self.resume_button.disabled = busy
        self.plan_button.disabled = busy
        self.stop_button.disabled = state not in ("starting", "running")
        result = state in ("stopped", "finished", "saved")
        self.result_row.layout.display = "flex" if result else "none"
        self.try_button.layout.display = None if self.result_kind.panel else "none"
        self.try_button.description = "Chat" if self.result_kind.panel == "chat" else "Generate"
        self.export_to.placeholder = f"{self.run_directory()}-hf"
