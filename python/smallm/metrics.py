"""Training metrics: ``metrics.jsonl`` always, a tqdm bar, optional TensorBoard and W&B, a loss plot.

Each line of ``metrics.jsonl`` is one JSON object with at least ``step``; training lines carry
``loss``, ``lr`` and ``tokens_per_s`` (and ``mfu`` where the device's peak is known), validation lines
``val_loss``, ``val_ppl`` and ``val_bpb`` (and a mixture's ``val/NAME_loss`` per source, each its own curve;
a staged run's stage boundaries are dotted lines).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

from smallm.files import write_bytes_atomic


class MetricsLogger:
    """Writes every record to ``out/metrics.jsonl`` and to whichever sinks are enabled."""

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
    ) -> None:
        self.out = out
        self.enabled = enabled
        self._file = open(out / "metrics.jsonl", "a", encoding="utf-8") if enabled else None  # noqa: SIM115
        self._bar: Any = None
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
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
        return plot_losses(self.out / "metrics.jsonl", self.out / "loss_curve.png")


def plot_losses(metrics: Path, target: Path) -> Path:
    """Plots training and validation loss from a ``metrics.jsonl``; a resumed run's later lines win."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, float] = {}
    val: dict[int, float] = {}
    sources: dict[str, dict[int, float]] = {}  # a mixture's val/NAME_loss
    stages: dict[int, int] = {}  # step -> stage, for a staged run's boundaries
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "loss" in record:
            train[record["step"]] = record["loss"]
            if "stage" in record:
                stages[record["step"]] = int(record["stage"])
        if "val_loss" in record:
            val[record["step"]] = record["val_loss"]
        for key, value in record.items():
            if key.startswith("val/") and key.endswith("_loss"):
                sources.setdefault(key[4:-5], {})[record["step"]] = value
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="validation")
    for name, points in sorted(sources.items()):
        ax.plot(sorted(points), [points[s] for s in sorted(points)], ".--", label=f"validation: {name}")
    steps = sorted(stages)
    for before, after in zip(steps, steps[1:]):
        if stages[after] != stages[before]:  # a stage starts: a line at the last step of the one before
            ax.axvline(before, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_bytes_atomic(target, image.getvalue())
    return target


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
