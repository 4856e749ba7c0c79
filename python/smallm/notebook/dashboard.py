"""The training dashboard: settings, Start / Stop / Resume, and the run's loss curves and progress, live.

The settings are the fields of the run's configuration dataclass (:class:`~smallm.train.config.TrainConfig`
for pretraining), each shown with its default and help, and checked by the same
:func:`~smallm.train.config.build_config` as the command line, so a bad value gets the message
``smallm-train`` gives. Start trains in the background (:class:`~smallm.notebook.session.TrainingSession`);
the plot, the progress bar (tokens/s, learning rate, MFU, time left), the latest sample and the
run's console lines follow as metrics arrive. Stop finishes the step under way and writes a checkpoint;
Resume continues it (as ``smallm-train --resume`` would). Opened on an existing run directory
(:meth:`Dashboard.of_run`), it shows the curves of its ``metrics.jsonl`` with its settings, ready to resume.

The widgets carry CSS classes (``smallm-dashboard``, ``smallm-plot``, ``smallm-progress``,
``smallm-status``, ``smallm-sample``, ``smallm-error``, ``smallm-start``, ``smallm-stop``,
``smallm-resume``) for styling and for tests that drive a browser.
"""

from __future__ import annotations

import dataclasses
import html
import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as w

from smallm.notebook.session import TrainingSession, error_message
from smallm.options import default_of, field_type
from smallm.run.layout import CONFIG_FILE, read_metrics
from smallm.train.config import RunConfig, TrainConfig, build_config
from smallm.train.metrics import LossCurves, loss_figure
from smallm.train.resolve import NOT_INHERITED

__all__ = ["TRAIN_FIELDS", "Dashboard", "SettingsForm"]

TRAIN_FIELDS = (
    "data", "out", "preset", "max_steps", "batch_size", "seq_len", "lr", "warmup_steps", "eval_every",
    "checkpoint_every", "device", "precision", "seed", "sample_prompt", "force",
)  # fmt: skip
"""The settings the dashboard shows for pretraining; the others keep their defaults (or a config file's)."""

PLOT_EVERY_S = 0.5
"""The plot is redrawn at most this often while metrics arrive (and always at the end)."""


class SettingsForm:
    """A widget per field of a configuration dataclass, and the validated configuration they make."""

    def __init__(self, cls: type[RunConfig], names: Sequence[str], values: dict[str, Any] | None = None) -> None:
        self.cls = cls
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting(s) {unknown}")
        self.fields = [by_name[n] for n in names]
        self.extra = dict(values or {})  # settings not shown (a config file's, or a run's) kept as given
        self.widgets: dict[str, w.ValueWidget] = {}
        for f in self.fields:
            default = self.extra.pop(f.name, default_of(f))
            self.widgets[f.name] = _widget_for(f, default)
        self.box = w.GridBox(
            list(self.widgets.values()), layout=w.Layout(grid_template_columns="repeat(3, minmax(0, 1fr))")
        )

    def values(self) -> dict[str, Any]:
        """The settings as the dataclass takes them (empty text: the field's default)."""
        values = dict(self.extra)
        for f in self.fields:
            values[f.name] = _parse(f, self.widgets[f.name].value)
        return values

    def config(self, **overrides: Any) -> RunConfig:
        """The validated configuration: ``ValueError`` with the command line's message for a bad value."""
        return build_config(self.cls, {**self.values(), **overrides}, source="settings")

    def set(self, **values: Any) -> None:
        for name, value in values.items():
            if name in self.widgets:
                field = next(f for f in self.fields if f.name == name)
                self.widgets[name].value = _shown(field, value)
            else:
                self.extra[name] = value


class Dashboard(w.VBox):
    """Settings, Start / Stop / Resume, and the live view of one run. ``settings``: values for the form
    (``Dashboard(preset="tiny", max_steps=200)``); ``fields``: which settings it shows."""

    def __init__(
        self, *, config_class: type[RunConfig] = TrainConfig, fields: Sequence[str] = TRAIN_FIELDS, **settings: Any
    ) -> None:
        self.form = SettingsForm(config_class, fields, settings)
        self.session: TrainingSession | None = None
        self.start_button = _button("Start", "success", "smallm-start", "train a new run in --out")
        self.stop_button = _button("Stop", "warning", "smallm-stop", "stop after this step, with a checkpoint")
        self.resume_button = _button("Resume", "info", "smallm-resume", "continue the run in --out")
        self.start_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.resume())
        self.progress = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="100%"))
        self.status = w.HTML("not started")
        self.error = w.HTML("")
        self.plot = w.Image(format="png", layout=w.Layout(width="640px"))
        self.sample = w.HTML("")
        self.console = w.Textarea(value="", disabled=True, layout=w.Layout(width="100%", height="110px"))
        for widget, name in ((self.progress, "smallm-progress"), (self.status, "smallm-status"),
                             (self.error, "smallm-error"), (self.plot, "smallm-plot"),
                             (self.sample, "smallm-sample"), (self.console, "smallm-log")):  # fmt: skip
            widget.add_class(name)
        self._drawn_at = 0.0
        self._lock = threading.Lock()
        buttons = w.HBox([self.start_button, self.stop_button, self.resume_button])
        super().__init__([
            w.HTML("<b>smallm training</b>"), self.form.box, buttons, self.error, self.progress, self.status,
            self.plot, w.HTML("<b>latest sample</b>"), self.sample, w.HTML("<b>console</b>"), self.console,
        ])  # fmt: skip
        self.add_class("smallm-dashboard")
        self._buttons("idle")
        self._show_existing_run()

    @classmethod
    def of_run(cls, run: str | Path, **settings: Any) -> Dashboard:
        """A dashboard on the run directory ``run``: its settings (from ``config.json``) and curves (from
        ``metrics.jsonl``), ready to resume; ``settings`` change some of them first."""
        config_path = Path(run) / CONFIG_FILE
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))["train"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{config_path}: not a smallm run's config.json ({e})") from e
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in saved.items() if k in known and k not in NOT_INHERITED}  # the device anew
        return cls(**{**values, "out": str(run), **settings})

    # ----- the buttons --------------------------------------------------------------------------

    def start(self, **overrides: Any) -> TrainingSession | None:
        """Starts a new run with the form's settings (``overrides`` on top); None when a setting is wrong
        (the message is shown)."""
        return self._launch(resume=False, **overrides)

    def resume(self, **overrides: Any) -> TrainingSession | None:
        """Continues the run in the form's ``out`` from its latest checkpoint."""
        return self._launch(resume=True, force=False, **overrides)

    def stop(self) -> None:
        """Stops the run after the step under way, with a checkpoint there."""
        if self.session is not None:
            self.session.stop()

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the run ends; returns its state (``finished``, ``stopped`` or ``failed``)."""
        return self.session.wait(timeout) if self.session is not None else "idle"

    def _launch(self, **overrides: Any) -> TrainingSession | None:
        if self.session is not None and self.session.running:
            self._show_error("a run is in progress: stop it first")
            return None
        try:
            cfg = self.form.config(**overrides)
        except Exception as e:  # the command line's message, in the widget
            self._show_error(error_message(e))
            return None
        self._show_error("")
        self.console.value = ""
        self.session = TrainingSession(cfg, on_update=self._update)
        self.session.start()
        return self.session

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
            self.plot.value = loss_figure(curves, size=(6.4, 3.4), dpi=100)

    def _show_existing_run(self) -> None:
        shown = self.form.widgets.get("out")
        out = Path(str(shown.value if shown is not None else self.form.extra.get("out", "")))
        records = read_metrics(out) if str(out) else []
        if not records:
            return
        self._draw(records)
        last = max((r["step"] for r in records), default=0)
        self.status.value = f"<code>saved run</code> · {html.escape(str(out), quote=False)}, step {last}"

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
        self.stop_button.disabled = state not in ("starting", "running")


def _button(label: str, style: str, css: str, tooltip: str) -> w.Button:
    button = w.Button(description=label, button_style=style, tooltip=tooltip)
    button.add_class(css)
    return button


def _widget_for(f: dataclasses.Field, value: Any) -> w.ValueWidget:
    """The widget of one setting: a dropdown for a choice, a checkbox for a flag, else a text box (empty
    for "the default")."""
    label, tooltip = f.name.replace("_", " "), f.metadata.get("help", "")
    style, layout = {"description_width": "110px"}, w.Layout(width="auto")
    choices = f.metadata.get("choices")
    if choices:
        return w.Dropdown(options=list(choices), value=value, description=label, tooltip=tooltip, style=style,
                          layout=layout)  # fmt: skip
    if field_type(f.type) is bool:
        return w.Checkbox(value=bool(value), description=label, tooltip=tooltip, indent=False, layout=layout)
    placeholder = "the built-in corpus" if f.name == "data" else "default"
    return w.Text(value=_shown(f, value), placeholder=placeholder, description=label, tooltip=tooltip, style=style,
                  layout=layout)  # fmt: skip


def _shown(f: dataclasses.Field, value: Any) -> Any:
    """A setting's value as its widget shows it."""
    if f.metadata.get("choices") or field_type(f.type) is bool:
        return value
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # a mixture: DIR:WEIGHT, ...
        return ", ".join(f"{d['path']}:{d['weight']}" if isinstance(d, dict) else str(d) for d in value)
    return str(value)


def _parse(f: dataclasses.Field, value: Any) -> Any:
    """A widget's value as the dataclass field takes it; ``ValueError`` naming the field."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return default_of(f) if f.name != "data" else None
    if f.name == "data" and "," in text:  # a mixture, as --data DIR:WEIGHT repeated
        return [part.strip() for part in text.split(",") if part.strip()]
    kind = field_type(f.type)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"settings: {f.name} must be {kind.__name__}, got {text!r}") from None
    return text
