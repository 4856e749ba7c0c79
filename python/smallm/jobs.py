"""The kinds of training run, each assembled from its parts: what ``smallm-train``, ``smallm-sft`` and
``smallm-dpo`` run.

:data:`TASKS` maps each configuration class to its task; :func:`build_trainer` joins the task, the model
(:func:`smallm.trainable.build_trainable`) and the optimizer (:func:`smallm.optim.build_optimizer`) into a
:class:`~smallm.trainer.Trainer`; :func:`run` fits it, one process of a torchrun job.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist

from smallm.config import DPOConfig, FinetuneConfig, RewardConfig, RunConfig, TrainConfig, validate
from smallm.distributed import autocast_dtype, setup_runtime
from smallm.optim import build_optimizer
from smallm.tasks import Task
from smallm.tasks.dpo import DPO
from smallm.tasks.lm import Pretraining
from smallm.tasks.reward import RewardModeling
from smallm.tasks.sft import SFT
from smallm.trainable import build_trainable
from smallm.trainer import Trainer, seed_everything

__all__ = ["TASKS", "build_trainer", "run"]

TASKS: dict[type[RunConfig], Callable[[Any], Task]] = {
    TrainConfig: Pretraining, FinetuneConfig: SFT, DPOConfig: DPO, RewardConfig: RewardModeling,
}  # fmt: skip
"""The task of each kind of run, by its configuration class."""


def build_trainer(cfg: RunConfig) -> Trainer:
    """The trainer of ``cfg``'s kind of run: its task reads the data, then the model is built."""
    validate(cfg)
    if type(cfg) not in TASKS:
        raise TypeError(f"no task for a {type(cfg).__name__}; known: {', '.join(c.__name__ for c in TASKS)}")
    runtime = setup_runtime(cfg.device)
    seed_everything(cfg.seed)
    task = TASKS[type(cfg)](cfg)
    model = build_trainable(cfg, task.tokenizer, runtime, autocast_dtype(cfg.precision, runtime.device))
    return Trainer(cfg, runtime, task, model, build_optimizer)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Builds and fits the trainer of ``cfg``; under torchrun, the ranks then leave the process group
    together (rank 0 may still be writing the plot and the sample, and a rank that tears its gloo
    connections down meanwhile can abort at exit)."""
    try:
        result = build_trainer(cfg).fit()
        if dist.is_initialized():
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
