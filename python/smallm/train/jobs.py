"""The kinds of training run, each assembled from its parts: what ``smallm-train``, ``smallm-sft`` and
``smallm-dpo`` run.

:data:`TASKS` maps each configuration class to its task; :func:`build_trainer` joins the task, the model
(:func:`smallm.train.trainable.build_trainable`) and the optimizer (:func:`smallm.train.optim.build_optimizer`) into a
:class:`~smallm.train.trainer.Trainer`; :func:`run` fits it, one process of a torchrun job.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from smallm.run.layout import RunDirectory
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig, RunConfig, TrainConfig
from smallm.train.distributed import autocast_dtype, setup_runtime
from smallm.train.optim import build_optimizer
from smallm.train.resolve import resolve
from smallm.train.tasks import Task
from smallm.train.tasks.dpo import DPO
from smallm.train.tasks.lm import Pretraining
from smallm.train.tasks.reward import RewardModeling
from smallm.train.tasks.sft import SFT
from smallm.train.trainable import build_trainable
from smallm.train.trainer import Trainer, seed_everything

__all__ = ["TASKS", "build_trainer", "run"]

TASKS: dict[type[RunConfig], Callable[[Any], Task]] = {
    TrainConfig: Pretraining, FinetuneConfig: SFT, DPOConfig: DPO, RewardConfig: RewardModeling,
}  # fmt: skip
"""The task of each kind of run, by its configuration class."""


def build_trainer(cfg: RunConfig) -> Trainer:
    """The trainer of ``cfg``'s kind of run: the settings are resolved (and logged), the run directory
    checked, then the task reads the data and the model is built."""
    if type(cfg) not in TASKS:
        raise TypeError(f"no task for a {type(cfg).__name__}; known: {', '.join(c.__name__ for c in TASKS)}")
    runtime = setup_runtime(cfg.device)
    cfg = resolve(cfg, runtime.device, runtime.world_size)
    runtime.log("settings: " + json.dumps(asdict(cfg), sort_keys=True))
    directory = RunDirectory(Path(cfg.out), cfg.inputs(), command=cfg.command, writer=runtime.main)
    directory.check(resume=cfg.resume, force=cfg.force)  # before the data and the model load
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
