"""The trainer's checkpoints: what a run saves every so often and how ``--resume`` restores it.

A checkpoint (:mod:`smallm.run.checkpoint` writes the format) holds the weights the model part names (the
whole model, or a LoRA run's adapter), the optimizer, schedule and grad-scaler states, the RNG states,
and every rank's data position (each rank reads its own part of the data). A sharded (FSDP2) run is
saved from a full replica gathered to rank 0 and restored by scattering a replica, so its checkpoints
are the same as an unsharded run's and load anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smallm.run.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from smallm.run.layout import WEIGHTS_FILE, held_run
from smallm.run.load import read_config
from smallm.train.distributed import Runtime, gather_to_replica, scatter_from_replica
from smallm.train.resolve import resume_changes
from smallm.train.tasks import Batches
from smallm.train.trainable import Trainable

__all__ = ["Checkpointer"]

Replica = Callable[[], "tuple[nn.Module, torch.optim.Optimizer]"]


class Checkpointer:
    """Saves and restores one run's state in ``out/checkpoints``. ``make_replica``: an unsharded CPU copy
    of the model and its optimizer, for a sharded run (None otherwise)."""

    def __init__(self, out: Path, runtime: Runtime, keep_last: int, make_replica: Replica | None) -> None:
        self.out, self.runtime, self.keep_last, self.make_replica = out, runtime, keep_last, make_replica

    def gathered(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any] | None:
        """Collective under FSDP: the whole model and optimizer on rank 0 (None on the other ranks);
        ``(model, optimizer)`` themselves when not sharded."""
        if self.make_replica is None:
            return model, optimizer
        return gather_to_replica(model, optimizer, self.make_replica, self.runtime.rank)

    def save(
        self, model: Trainable, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, loader: Batches,
        state: TrainingState, run_config: dict[str, Any], *, is_best: bool,
    ) -> None:  # fmt: skip
        """Collective under torchrun: every rank's data position goes into ``state``, rank 0 writes."""
        positions: list[Any] = [loader.state_dict()]
        if self.runtime.world_size > 1:
            positions = [None] * self.runtime.world_size
            dist.all_gather_object(positions, loader.state_dict())
        state.loader = {"world_size": self.runtime.world_size, "ranks": positions}
        whole = self.gathered(model.module, optimizer)
        if self.runtime.main and whole is not None:
            save_checkpoint(
                self.out, whole[0], whole[1], scheduler, scaler, state, run_config, keep_last=self.keep_last,
                is_best=is_best, weights=model.checkpoint_tensors(),
            )  # fmt: skip
        if self.runtime.world_size > 1:
            dist.barrier()

    def resume(
        self, model: Trainable, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, loader: Batches,
        settings: dict[str, Any] | None = None,
    ) -> TrainingState:  # fmt: skip
        """Restores the latest checkpoint in ``out`` and this rank's data position; returns the state.
        ``settings``: the resumed run's, checked against the checkpoint's (:func:`resume_changes`); the
        changes it may make are logged."""
        path = latest_checkpoint(self.out)
        if path is None:
            stopped = "the run there stopped before its first: start it over with --force instead of --resume"
            raise ValueError(
                f"--resume: {self.out} has no checkpoint to continue from; "
                + (stopped if held_run(self.out) else "train without --resume first")
            )
        newest = latest_checkpoint(self.out, needs=(WEIGHTS_FILE,))
        if newest is not None and newest != path:
            self.runtime.log(f"{newest} lacks the training state --resume needs; resuming from {path}")
        saved = read_config(path)
        if settings is not None:
            for change in resume_changes(saved.get("train", {}), settings, str(path)):
                self.runtime.log(f"changed on resume: {change}")
        trained_on, opened = saved.get("lora", {}), model.run_config().get("lora", {})
        if trained_on.get("base_sha256") not in (None, opened.get("base_sha256")):
            raise CheckpointError(
                f"{path}: this LoRA run was trained on a base with other weights than the one it opens now "
                f"({opened.get('base')}): that base was continued or replaced since the run began"
            )
        if self.make_replica is not None:
            replica, replica_opt = self.make_replica()
            state, _ = load_checkpoint(path, replica, replica_opt, scheduler, scaler)
            scatter_from_replica(model.module, optimizer, replica, replica_opt)
        else:
            whole = model.checkpoint_tensors() is None
            state, _ = load_checkpoint(path, model.module if whole else None, optimizer, scheduler, scaler)
            if not whole:
                model.restore(load_weights(path), str(path))
        positions = state.loader
        if positions.get("world_size") != self.runtime.world_size:
            raise ValueError(
                f"{path} was written by {positions.get('world_size')} process(es); resume it with as many "
                f"(this run has {self.runtime.world_size}): each one continues its own part of the data"
            )
        loader.load_state_dict(positions["ranks"][self.runtime.rank])
        self.runtime.log(f"resumed from {path} at step {state.step}")
        return state
