"""A training run in a background thread, for a notebook: start, watch, stop, resume.

:class:`TrainingSession` runs the same trainer as the console scripts (:func:`smallm.train.jobs.build_trainer`)
in a thread of the kernel, so the notebook stays usable while it trains. It keeps what a view needs:
the metrics lines as they arrive (those already in the run's ``metrics.jsonl`` first, when resuming),
the progress (step, tokens/s, learning rate, MFU, time left), a sample generated at each validation,
the console lines the run printed, and the outcome. :meth:`TrainingSession.stop` asks the trainer to stop
after the step under way with a checkpoint there, so ``smallm-train --resume`` (or :meth:`resume`)
continues exactly as if it had never stopped.

A failure never reaches the kernel: it ends the session in ``"failed"`` with the message the command
line would print (a bad data directory, a diverged loss, CUDA out of memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from smallm.errors import SmallmError
from smallm.run.layout import read_metrics
from smallm.train.config import RunConfig

__all__ = ["Progress", "TrainingSession", "console_of_this_thread", "error_message"]

STATES = ("idle", "starting", "running", "stopping", "stopped", "finished", "failed")
"""What a session goes through: idle -> starting (reading data, building the model) -> running
[-> stopping] -> stopped, finished or failed."""


def error_message(error: BaseException) -> str:
    """What ``smallm-train`` prints for ``error``: the message of a known failure (a smallm error, a bad
    value, an unreadable file), advice when the host ran out of memory, else the exception's type and
    message."""
    if isinstance(error, MemoryError):  # the host's memory (CUDA's is the trainer's TrainingError)
        return (
            "the machine ran out of memory; try a smaller batch_size (with more batch_tokens' micro-batches), "
            "a shorter seq_len or a smaller preset"
        )
    if isinstance(error, (SmallmError, ValueError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclasses.dataclass
class Progress:
    """Where a run stands, from its latest metrics line."""

    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    lr: float | None = None
    mfu: float | None = None
    seconds_left: float | None = None

    def line(self) -> str:
        """One line: ``step 40 / 300 · loss 3.21 · val 3.40 · 12.3k tokens/s · lr 1.20e-03 · MFU 4.1% · 1m20s left``."""
        parts = [f"step {self.step} / {self.max_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val {self.val_loss:.4f}")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s / 1e3:.1f}k tokens/s")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        parts.append("MFU n/a" if self.mfu is None else f"MFU {100 * self.mfu:.1f}%")
        if self.seconds_left is not None:
            parts.append(f"{duration(self.seconds_left)} left")
        return " · ".join(parts)


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``3700`` -> ``1h01m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TrainingSession:
    """One run of ``cfg`` (any :class:`~smallm.train.config.RunConfig`: pretraining, SFT, DPO, a reward model)
    in a background thread. ``on_update(session, record)`` is called from that thread after each metrics
    line, sample and change of state (``record`` is None for the latter two)."""

    def __init__(self, cfg: RunConfig, *, on_update: Callable[[TrainingSession, Any], None] | None = None) -> None:
        self.cfg = cfg
        self.on_update = on_update
        self.state = "idle"
        self.records: list[dict[str, Any]] = []
        self.progress = Progress(max_steps=cfg.max_steps)
        self.sample: str | None = None
        self.log: list[str] = []
        self.error: str | None = None
        self.traceback: str | None = None
        self.result: dict[str, Any] | None = None
        self.trainer: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._steps_timed: tuple[float, int] | None = None  # (time, step) of the first line seen

    # ----- control ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Starts the run in a background thread (refused while one runs)."""
        if self.running:
            raise RuntimeError("this session is training already; stop it first")
        self.state, self.error, self.traceback, self.result = "starting", None, None, None
        self._stop.clear()
        self._steps_timed = None
        self._thread = threading.Thread(target=self._run, name=f"smallm training {self.cfg.out}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Asks the run to stop after the step under way, with a checkpoint there (a no-op when idle)."""
        if not self.running:
            return
        self._stop.set()
        self._set_state("stopping")
        if self.trainer is not None:
            self.trainer.request_stop()

    def wait(self, timeout: float | None = None) -> str:
        """Blocks until the run ends (or ``timeout`` seconds pass); returns the state. Interrupting the
        kernel meanwhile stops the run as :meth:`stop` does, and waits for its checkpoint."""
        if self._thread is None:
            return self.state
        try:
            self._thread.join(timeout)
        except KeyboardInterrupt:
            self.stop()
            self._thread.join()
            raise
        return self.state

    def resumed(self) -> TrainingSession:
        """A session of the same run that continues from its latest checkpoint."""
        return TrainingSession(dataclasses.replace(self.cfg, resume=True, force=False), on_update=self.on_update)

    # ----- the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        from smallm.train.jobs import build_trainer

        with console_of_this_thread(self._console_line):
            try:
                if self.cfg.resume:  # the curves start with the steps before
                    self.records = read_metrics(Path(self.cfg.out))
                trainer = build_trainer(self.cfg)
                self.cfg = trainer.cfg  # the settings in force, as config.json records them
                trainer.progress_bar = False
                trainer.listeners.append(self._on_record)
                self.trainer = trainer
                self.progress.max_steps, self.progress.step = trainer.max_steps, trainer.state.step
                if self._stop.is_set():  # Stop was pressed while the data was being read
                    trainer.request_stop()
                else:
                    self._set_state("running")
                self.result = trainer.fit()
                if "sample" in self.result:
                    self.sample = self.result["sample"]
                self._set_state("stopped" if "stopped_at" in self.result else "finished")
            except BaseException as e:  # the kernel must survive anything the run raises
                self.error = error_message(e)
                self.traceback = traceback.format_exc()
                self._set_state("failed")
            finally:
                self.trainer = None  # frees the model and optimizer; the checkpoints have them

    def _on_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        p = self.progress
        p.step = record["step"]
        if "loss" in record:
            p.loss, p.lr = record["loss"], record.get("lr")
            p.tokens_per_s, p.mfu = record.get("tokens_per_s"), record.get("mfu")
        if "val_loss" in record:
            p.val_loss = record["val_loss"]
        now = time.perf_counter()
        if self._steps_timed is None:
            self._steps_timed = (now, p.step)
        elif p.step > self._steps_timed[1]:
            per_step = (now - self._steps_timed[0]) / (p.step - self._steps_timed[1])
            p.seconds_left = per_step * (p.max_steps - p.step)
        self._notify(record)
        if "val_loss" in record and self.trainer is not None and self.trainer.runtime.main:
            self.sample = self.trainer.task.sample(self.trainer.model.module)  # its own seeded generator
            self._notify(None)

    def _console_line(self, line: str) -> None:
        self.log.append(line)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._notify(None)

    def _notify(self, record: Any) -> None:
        if self.on_update is not None:
            try:
                self.on_update(self, record)
            except Exception:  # a broken view must not stop the training
                self.log.append("the view failed to update:\n" + traceback.format_exc())


class _ThreadStream:
    """``sys.stderr`` while a session trains: lines written by that session's thread go to ``sink``,
    everything else to the stream it replaced."""

    def __init__(self, original: TextIO, thread: threading.Thread, sink: Callable[[str], None]) -> None:
        self.original, self.thread, self.sink = original, thread, sink
        self.pending = ""

    def write(self, text: str) -> int:
        if threading.current_thread() is not self.thread:
            return self.original.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.sink(line)
        return len(text)

    def flush(self) -> None:
        if threading.current_thread() is not self.thread:
            self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


@contextlib.contextmanager
def console_of_this_thread(sink: Callable[[str], None]) -> Iterator[None]:
    """Sends what this thread prints to stderr (progress lines, warnings) to ``sink`` instead of whichever
    notebook cell happens to be running."""
    stream = _ThreadStream(sys.stderr, threading.current_thread(), sink)
    sys.stderr = stream  # type: ignore[assignment]
    try:
        yield
    finally:
        if stream.pending:
            sink(stream.pending)
        if sys.stderr is stream:
            sys.stderr = stream.original
