"""Benchmark tasks during training: the run's ``eval_tasks`` (lm-evaluation-harness) at each validation.

:class:`TaskEvaluation` scores the model being trained on the named lm-eval tasks through
:class:`smallm.inference.harness.SmallmLM`, with the run's tokenizer, its ``batch_size`` and its autocast, and
returns the flat metrics (``task/NAME_acc``, ``task/core``, ``task/seconds``) that the trainer logs with the
validation metrics: into ``metrics.jsonl``, the progress line, the loss plot and the notebook dashboard.

Under DDP the main rank evaluates while the others wait at a barrier. lm-eval seeds Python's, numpy's and
torch's generators; the training generators are captured before and restored after, so a run with tasks
draws the same batches, and resumes as exactly, as one without.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from smallm.model.lm import SmallLM
from smallm.run.rng import capture_rng_state, restore_rng_state
from smallm.text.tokenizer import Tokenizer
from smallm.train.distributed import Runtime

__all__ = ["TaskEvaluation", "task_names"]


def task_names(tasks: str | None) -> list[str]:
    """The task names of an ``eval_tasks`` setting (comma-separated)."""
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


class TaskEvaluation:
    """The lm-eval tasks of a run's settings (``eval_tasks``, ``eval_limit``, ``eval_fewshot``,
    ``eval_include_path``), scored on demand."""

    def __init__(self, cfg: Any, tokenizer: Tokenizer, runtime: Runtime, amp_dtype: torch.dtype | None) -> None:
        self.tasks = task_names(cfg.eval_tasks)
        self.cfg, self.tokenizer, self.runtime, self.amp_dtype = cfg, tokenizer, runtime, amp_dtype
        self.include = [cfg.eval_include_path] if cfg.eval_include_path else []
        if self.tasks and runtime.main:  # unknown names stop the run before its first step
            from smallm.inference.harness import task_manager

            task_manager(self.tasks, self.include)

    def __bool__(self) -> bool:
        return bool(self.tasks)

    def __call__(self, model: SmallLM) -> dict[str, float]:
        """The tasks' metrics for ``model`` (on the main rank; {} on the others)."""
        metrics: dict[str, float] = {}
        if self.runtime.main:
            from smallm.inference.harness import SmallmLM, evaluate_tasks

            state = capture_rng_state()
            start = time.perf_counter()
            try:
                lm = SmallmLM(model, self.tokenizer, batch_size=self.cfg.batch_size, amp_dtype=self.amp_dtype)
                results = evaluate_tasks(
                    lm, self.tasks, include_path=self.include, limit=self.cfg.eval_limit,
                    num_fewshot=self.cfg.eval_fewshot,
                )  # fmt: skip
            finally:
                restore_rng_state(state)
            metrics = {**results["summary"], "task/seconds": time.perf_counter() - start}
        if self.runtime.world_size > 1:
            dist.barrier()
        return metrics
