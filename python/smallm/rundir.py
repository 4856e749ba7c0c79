"""A run directory while a run trains in it: one run per directory, one process at a time, and no
debris left by a run that was killed.

* A new run (no ``--resume``) refuses a directory that holds a run (its ``config.json``, ``metrics.jsonl``
  or checkpoints), naming ``--resume`` and ``--force``; ``--force`` deletes that run's files first (and
  only those: anything else in the directory stays).
* The process that writes (rank 0) holds a :class:`~smallm.files.DirectoryLock` on the directory from
  the first write to the end, so a second run on it stops at once naming the first.
* On start, the temporary files and folders of writes a killed run left half done (``.NAME.tmp-PID``,
  ``.NAME.old-PID``) are deleted; on resume, ``metrics.jsonl`` loses the lines of the steps after the
  checkpoint, which the resumed run logs again.
* :func:`resume_changes` compares the settings a run was started with against those it is resumed with:
  the ones the resumed run applies are listed (for the log), any other change is refused.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smallm.errors import listing
from smallm.files import DestinationError, DirectoryLock, write_text_atomic

__all__ = ["RESUMABLE", "RUN_ENTRIES", "RunDirectory", "held_run", "resume_changes", "trim_metrics"]

RUN_ENTRIES = (
    "config.json", "metrics.jsonl", "loss_curve.png", "tokenizer.json", "tokenizer.tiktoken", "tokenizer_config.json",
    "checkpoints",
    "adapter", "tensorboard",
)  # fmt: skip
"""What a training run writes in its directory (what ``--force`` deletes)."""
MARKS = ("config.json", "metrics.jsonl", "checkpoints")
"""The entries that show a directory holds a run."""
RESUMABLE = frozenset({
    "lr", "embedding_lr", "head_lr", "norm_lr", "max_steps", "epochs", "schedule", "warmup_steps",
    "decay_fraction", "min_lr_ratio", "grad_clip", "log_every", "eval_every", "eval_batches",
    "checkpoint_every", "keep_last", "tensorboard", "wandb_project", "sample_prompt", "sample_tokens",
    "compile", "activation_checkpointing", "device", "dry_run", "verify_data",
})  # fmt: skip
"""Settings a resumed run may change, and applies: the peak rates and the schedule (recomputed for the
new length), the run's length, clipping, and when it logs, validates, saves and what it samples."""
IGNORED = frozenset({"out", "resume", "force"})
_DEBRIS = re.compile(r"\..+\.(tmp|old)-\d+")


class RunDirectory:
    """The directory ``out`` of a run; :meth:`open` before the first write, :meth:`close` at the end."""

    def __init__(self, out: Path, command: str | None = None, *, writer: bool = True) -> None:
        self.out, self.writer = out, writer
        self.lock = DirectoryLock(out, command) if writer else None

    def check_new_run(self, force: bool) -> None:
        """Refuses (unless ``force``) to start a new run where one is: see the module docstring. The
        writer's check: the other ranks would see what the writer has begun to write."""
        if not self.writer:
            return
        found = held_run(self.out)
        if found and not force:
            raise DestinationError(
                f"{self.out} already holds a run ({found}); continue it with --resume, start over there with "
                "--force (its checkpoints and metrics are deleted), or choose another --out"
            )

    def open(self, *, resume: bool, force: bool) -> None:
        """Locks the directory (the writer), then checks it again under the lock (another run may have
        started since), deletes the previous run under ``force`` and the debris of killed writes."""
        if self.lock is None:
            return
        self.lock.acquire()
        try:
            if not resume:
                self.check_new_run(force)
                for name in RUN_ENTRIES:
                    _delete(self.out / name)
            for folder in (self.out, self.out / "checkpoints"):
                for entry in folder.iterdir() if folder.is_dir() else ():
                    if _DEBRIS.fullmatch(entry.name):
                        _delete(entry)
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def held_run(out: Path) -> str:
    """What shows that ``out`` holds a run (empty when it does not)."""
    found = [name for name in MARKS if (out / name).exists()]
    steps = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    if steps:
        found[found.index("checkpoints")] = f"checkpoints up to {steps[-1].name}"
    elif "checkpoints" in found:
        found.remove("checkpoints")
    return ", ".join(found)


def trim_metrics(out: Path, step: int) -> int:
    """Drops the lines of ``out/metrics.jsonl`` logged after ``step`` (a resume from that step logs them
    again) and a last line cut short by a kill; returns how many were dropped."""
    path = out / "metrics.jsonl"
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


def resume_changes(saved: Mapping[str, Any], now: Mapping[str, Any], where: str) -> list[str]:
    """The settings of ``now`` that differ from ``saved`` (the run's ``train`` section at the checkpoint
    ``where``), as ``name: old -> new`` lines. Raises ``ValueError`` naming every changed setting a
    resumed run cannot apply (only :data:`RESUMABLE` ones may change)."""
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and k not in IGNORED and saved[k] != v}
    # Stages may be appended (continual pretraining carries the optimizer on), never rewritten.
    appended = "stage" in changed and changed["stage"][1][: len(changed["stage"][0])] == changed["stage"][0]
    refused = sorted(k for k in changed if k not in RESUMABLE and not (k == "stage" and appended))
    if refused:
        details = [f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused]
        raise ValueError(
            f"--resume from {where} cannot change {listing(details)}: the checkpoint's state depends on them. "
            "Resume with the run's settings, or start a new run from its weights"
        )
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())]


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
