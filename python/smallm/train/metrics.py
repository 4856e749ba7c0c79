"""Training metrics: ``metrics.jsonl`` always, a tqdm bar, optional TensorBoard and W&B, a loss plot.

Each line of ``metrics.jsonl`` is one JSON object with at least ``step``; training lines carry
``loss``, ``lr``, ``tokens_per_s`` and ``mfu`` (against the datasheet peak of a known GPU, the matmul peak
measured on the CPU; none on an unknown GPU), validation lines
``val_loss``, ``val_ppl`` and ``val_bpb`` (and a mixture's ``val/NAME_loss`` per source, each its own curve;
a staged run's stage boundaries are dotted lines). Preference runs add their accuracy and margin
(:data:`PREFERENCE_METRICS`), drawn in a panel of their own below the loss.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallm.files.atomic import write_bytes_atomic
from smallm.run.layout import METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR, read_metrics

PREFERENCE_METRICS = {"reward_accuracy": "accuracy", "reward_margin": "margin", "accuracy": "accuracy",
                      "margin": "margin"}  # fmt: skip
"""The preference runs' metrics (DPO's ``reward_*``, a reward model's own; ``val_``-prefixed at validation) and the
curve each is: the share of pairs whose chosen reply wins, and the mean margin by which it does."""


class MetricsLogger:
    """Writes every record to ``out/metrics.jsonl`` and to whichever sinks are enabled: the tqdm bar
    (``progress_bar``), TensorBoard, W&B, and each of ``listeners`` (called with the record)."""

    def __init__(
        self,
        out: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_config: dict[str, Any] | None = None,
        enabled: bool = True,
        listeners: Sequence[Callable[[dict[str, Any]], None]] = (),
        progress_bar: bool = True,
    ) -> None:
        self.out = out
        self.enabled = enabled
        self.listeners = list(listeners)
        self._file = open(out / METRICS_FILE, "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._bar: Any = None
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
            except ImportError:
                warnings.warn("--tensorboard needs `pip install tensorboard`; not logging to TensorBoard", stacklevel=2)
        if wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=wandb_project, dir=str(out), config=run_config, resume="allow")
            except Exception as e:  # wandb raises several types when offline or not logged in
                warnings.warn(f"W&B logging is off: {e}", stacklevel=2)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            self._bar.set_postfix({k: _short(k, v) for k, v in shown.items()}, refresh=False)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        for listener in self.listeners:
            listener(dict(record))  # a copy: the caller may go on changing its own

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def plot(self) -> Path | None:
        """Writes ``loss_curve.png`` (training and validation loss per step) from ``metrics.jsonl``."""
        if not self.enabled:
            return None
        return plot_losses(self.out)


def plot_losses(run: Path) -> Path:
    """Plots a run's training and validation loss (``loss_curve.png``) from its ``metrics.jsonl``; a resumed
    run's later lines win."""
    target = run / PLOT_FILE
    write_bytes_atomic(target, loss_figure(LossCurves.of(read_metrics(run))))
    return target


@dataclass
class LossCurves:
    """The curves of a run's metrics lines, by step: training loss, validation loss, each mixture source's
    validation loss (``val/NAME_loss``), and the stage of each training line (a staged run's boundaries)."""

    train: dict[int, float] = field(default_factory=dict)
    val: dict[int, float] = field(default_factory=dict)
    sources: dict[str, dict[int, float]] = field(default_factory=dict)
    stages: dict[int, int] = field(default_factory=dict)
    tasks: dict[str, dict[int, float]] = field(default_factory=dict)
    """Accuracies of the lm-eval tasks of ``--eval-tasks`` (``task/NAME_acc``) and their ``task/core``."""
    preference: dict[str, dict[int, float]] = field(default_factory=dict)
    """A preference run's ``accuracy`` and ``margin`` curves, and their ``validation accuracy`` and ``validation
    margin`` (:data:`PREFERENCE_METRICS`)."""

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]]) -> LossCurves:
        """The curves of ``records`` in order; a later line for a step replaces an earlier one (a resumed run)."""
        curves = cls()
        for record in records:
            curves.add(record)
        return curves

    def add(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if "loss" in record:
            self.train[step] = record["loss"]
            if "stage" in record:
                self.stages[step] = int(record["stage"])
        if "val_loss" in record:
            self.val[step] = record["val_loss"]
        for key, value in record.items():
            if key.startswith("val/") and key.endswith("_loss"):
                self.sources.setdefault(key[4:-5], {})[step] = value
            elif key.startswith("task/") and (key.endswith("_acc") or key == "task/core"):
                self.tasks.setdefault(key[5:].removesuffix("_acc"), {})[step] = value
        for key, name in PREFERENCE_METRICS.items():
            if key in record:
                self.preference.setdefault(name, {})[step] = record[key]
            if f"val_{key}" in record:
                self.preference.setdefault(f"validation {name}", {})[step] = record[f"val_{key}"]

    def stage_starts(self) -> list[int]:
        """The last step of each stage that another one follows."""
        steps = sorted(self.stages)
        return [before for before, after in zip(steps, steps[1:]) if self.stages[after] != self.stages[before]]


def loss_figure(curves: LossCurves, *, size: tuple[float, float] = (7, 4), dpi: int = 120) -> bytes:
    """The PNG of ``curves``: training and validation loss per step, a dashed curve per mixture source and a
    dotted line where a stage starts; below it, for a preference run, a second panel of the same ``size``
    with its accuracy (left axis) and margin (right axis). Drawn on a Figure of its own (no pyplot state), so
    any thread may call it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if curves.preference else 1
    fig = Figure(figsize=(size[0], size[1] * panels), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(panels, 1, 1)
    _draw_loss(ax, curves)
    if curves.preference:
        _draw_preference(fig.add_subplot(panels, 1, 2, sharex=ax), curves.preference)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    return image.getvalue()


def _plot(ax: Any, points: dict[int, float], style: str, label: str) -> None:
    ax.plot(sorted(points), [points[s] for s in sorted(points)], style, label=label)


def _legend(*axes: Any) -> None:
    """One legend on the first of ``axes`` for the curves of all of them (an axis and its twin)."""
    handles = [h for a in axes for h in a.get_legend_handles_labels()[0]]
    labels = [label for a in axes for label in a.get_legend_handles_labels()[1]]
    if handles:
        axes[0].legend(handles, labels, fontsize="small")


def _draw_loss(ax: Any, curves: LossCurves) -> None:
    _plot(ax, curves.train, "-", "train")
    if curves.val:
        _plot(ax, curves.val, "o-", "validation")
    for name, points in sorted(curves.sources.items()):
        _plot(ax, points, ".--", f"validation: {name}")
    for step in curves.stage_starts():
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    if not curves.tasks:
        _legend(ax)
        return
    right = ax.twinx()  # benchmark accuracies on a right-hand axis
    for name, points in sorted(curves.tasks.items()):
        _plot(right, points, "s:", f"task: {name}")
    right.set_ylabel("task accuracy (core: centered on chance)")
    _legend(ax, right)


def _draw_preference(ax: Any, preference: dict[str, dict[int, float]]) -> None:
    """Accuracy on the left axis (0 to 1), margin on a right-hand one; validation as points joined."""
    right = ax.twinx()
    for name, points in sorted(preference.items()):
        axis, color = (ax, "tab:green") if name.endswith("accuracy") else (right, "tab:purple")
        axis.plot(sorted(points), [points[s] for s in sorted(points)], "o-" if name.startswith("validation") else "-",
                  color=color, alpha=1.0 if name.startswith("validation") else 0.6, label=name)  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("preference accuracy")
    right.set_ylabel("reward margin (chosen - rejected)")
    ax.grid(alpha=0.3)
    _legend(ax, right)


def _short(name: str, value: float) -> str:
    if name == "stage" or name.startswith("epoch/"):
        return f"{value:g}" if name == "stage" else f"{value:.2f}"
    if name == "tokens_per_s":
        return f"{value / 1e3:.1f}k"
    if name == "lr":
        return f"{value:.2e}"
    if name == "mfu":
        return f"{100 * value:.1f}%"
    return f"{value:.4f}"
