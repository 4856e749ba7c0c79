"""Tasks: what one kind of training run computes, given to :class:`smallm.train.trainer.Trainer` as a part.

A task (pretraining a language model, SFT, DPO) owns its data and what is done with it; the trainer
owns the loop that is the same for all of them (accumulation, normalisation across micro-batches and
ranks, clipping, mixed precision, DDP/FSDP, checkpoints, logging). The task supplies:

* its tokenizer (from the data, or from the checkpoint it fine-tunes);
* once the model is built, through :meth:`Task.attach`, its :class:`Objective` (the loss and its token
  count, the training and validation metrics); DPO also takes its frozen reference there;
* the endless training batches and the number of steps they make;
* the validation batches, the sample generated at the end, and its section of the run's config.

Adding a kind of run means writing a task (and a config for it): nothing of the trainer is overridden.
A task whose steps differ (pretraining's stages) also overrides :meth:`Task.micro_batches_at` (the step's
micro-batches) and :meth:`Task.stage_ends_at` (validate there too); a task that subclasses :class:`Task`
inherits the defaults (the run's micro-batches; validation every ``eval_every`` steps only).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from smallm.text.tokenizer import Tokenizer
from smallm.train.distributed import Runtime

__all__ = ["Batch", "Batches", "Objective", "RunContext", "Task", "ValidationBatches"]

Batch = tuple[Tensor, ...]
"""``(x, y)`` or ``(x, y, segment_ids)``: inputs, targets (-100 where not supervised) and packing."""


class Batches(Protocol):
    """Endless training batches whose position can be saved and restored exactly."""

    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ValidationBatches(Protocol):
    """One pass of validation batches, with its length (iterated again for every evaluation)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class RunContext:
    """What a task learns of the run once the model exists."""

    runtime: Runtime
    vocab_size: int
    """The model's embedding rows (may exceed the tokenizer's ids)."""
    seq_len: int
    batch_size: int
    seed: int
    amp_dtype: torch.dtype | None
    """The autocast dtype (None: fp32)."""
    frozen_start: Callable[[], Callable[[], AbstractContextManager[nn.Module]]]
    """Freezes the model as it is now and returns what opens that frozen model (DPO's reference): a
    full model is copied; a LoRA model is opened with its adapters disabled, without a copy."""

    def autocast(self) -> AbstractContextManager[Any]:
        device = self.runtime.device.type
        return torch.autocast(device, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


class Objective(Protocol):
    """The loss of a task and what it reports. Losses are sums, normalised by the trainer with the
    :meth:`count` of the whole step (all micro-batches, all ranks)."""

    def count(self, batch: Batch) -> Tensor:
        """What the step's loss is averaged over (target tokens, pairs), as a 0-d tensor."""
        ...

    def loss(self, net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(summed loss, stats)`` of one micro-batch under autocast; ``stats`` (detached, 1-d) are
        summed over the step's micro-batches and ranks for :meth:`train_metrics`."""
        ...

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        """The step's training metrics (at least ``loss``) from the summed stats and count."""
        ...

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> Tensor:
        """Summed validation statistics over ``batches`` (the trainer all-reduces them)."""
        ...

    def validation_metrics(self, sums: Tensor) -> dict[str, float]:
        """The validation metrics (at least ``val_loss``; empty without targets) from the sums."""
        ...


class Task(Protocol):
    """One kind of training run's data, objective and sample; see the module docstring."""

    tokenizer: Tokenizer

    def attach(self, context: RunContext) -> Objective:
        """Called once, after the model is built and before any checkpoint is loaded into it."""
        ...

    def train_batches(self) -> Batches: ...

    def max_steps(self, rows_per_step: int) -> int:
        """The optimizer steps of the run, when each takes ``rows_per_step`` rows (over all ranks)."""
        ...

    def validation_batches(self) -> ValidationBatches | None:
        """One pass of this rank's validation batches (with ``len``), or None without validation data."""
        ...

    def sample(self, model: nn.Module) -> str:
        """Text the model generates at the end of the run, for the user to look at."""
        ...

    def run_config(self) -> dict[str, Any]:
        """The task's sections of the run's ``config.json`` (besides ``train`` and ``model``)."""
        ...

    def micro_batches_at(self, step: int) -> int | None:
        """The micro-batches of the optimizer step after ``step`` steps when the task sets them (pretraining's
        stages, each of its own batch size); None: the run's."""
        return None

    def stage_ends_at(self, step: int) -> bool:
        """Whether validation runs after step ``step`` besides every ``eval_every`` steps (where a stage ends)."""
        return False

    def new_rows_at(self, step: int) -> int | None:
        """When the optimizer step after ``step`` steps trains only the embedding and head rows of new tokens
        (a stage with ``train = "new-tokens"``, :mod:`smallm.train.new_rows`): the first new id. None: all."""
        return None
