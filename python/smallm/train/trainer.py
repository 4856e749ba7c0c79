"""The training loop, the same for every kind of run, assembled from the parts it is given.

A :class:`Trainer` is given a configuration (:mod:`smallm.train.config`), a task (:mod:`smallm.train.tasks`: the
data, the objective, the sample), the model to train (:mod:`smallm.train.trainable`: full or adapters) and an
optimizer builder (:mod:`smallm.train.optim`); it owns what every run does alike:

* one optimizer step: several micro-batches per rank (``batch_tokens`` or ``grad_accum`` say how many);
  each one's loss is a sum, divided by the
  objective's count (target tokens, pairs) of *all* micro-batches on *all* ranks, so the gradient is the
  mean over the whole step (not a mean of per-micro-batch means); the global gradient norm clipped after
  synchronisation; a non-finite step stops the run with advice;
* mixed precision by autocast (bf16, or fp16 with a GradScaler) over fp32 weights; DDP or FSDP2 under
  torchrun; ``torch.compile`` with a fallback to the plain model;
* validation every ``eval_every`` steps (with the lm-eval tasks of ``eval_tasks``, :mod:`smallm.train.task_eval`),
  the best checkpoint kept by validation loss, checkpoints that
  resume bitwise-identically (:mod:`smallm.train.checkpointer`), ``metrics.jsonl`` and the plot;
* a stop asked for from another thread (:meth:`Trainer.request_stop`, the notebook's Stop button): the
  step under way finishes, a checkpoint is written, and ``--resume`` continues as if never stopped;
  :attr:`Trainer.listeners` see every metrics line as it is logged.

:func:`smallm.train.jobs.build_trainer` picks the parts for a configuration.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from smallm.data.loader import IGNORE_INDEX
from smallm.data.sampling import DataExhausted
from smallm.errors import SmallmError
from smallm.model.lm import SmallLM
from smallm.run.checkpoint import CheckpointError, TrainingState, latest_checkpoint
from smallm.run.layout import RunDirectory, has_tokenizer, trim_metrics, write_run_config
from smallm.train.checkpointer import Checkpointer
from smallm.train.config import RunConfig, validate
from smallm.train.distributed import Runtime, all_finite, autocast_dtype, shard_model, wrap_model
from smallm.train.memory import flops_per_token, measured_peak_flops, mfu, peak_flops, warn_unknown_device
from smallm.train.metrics import MetricsLogger
from smallm.train.new_rows import NewRowsOnly
from smallm.train.optim import build_schedule, describe, restore_schedule
from smallm.train.resolve import is_resolved, resolve_training
from smallm.train.task_eval import TaskEvaluation
from smallm.train.tasks import Batch, RunContext, Task
from smallm.train.trainable import Trainable

__all__ = ["OptimizerBuilder", "Trainer", "TrainingError"]

OptimizerBuilder = Callable[..., torch.optim.Optimizer]
"""``(model, cfg, device, *, total_steps) -> optimizer`` over the model's trainable parameters, at the
resolved settings' rates (:func:`smallm.train.optim.build_optimizer`)."""


class TrainingError(SmallmError, RuntimeError):
    """Training stopped for a reason the user must act on (the message says what to do)."""


class Trainer:
    """Trains ``model`` on ``task`` as ``cfg`` says; :meth:`fit` runs to the last step."""

    def __init__(
        self, cfg: RunConfig, runtime: Runtime, task: Task, model: Trainable, build_optimizer: OptimizerBuilder
    ) -> None:
        if not is_resolved(cfg):  # given by hand rather than by build_trainer, with a task that has its data
            validate(cfg)
            cfg = resolve_training(cfg, runtime.device, runtime.world_size, model.config)
        self.cfg, self.runtime, self.task, self.model = cfg, runtime, task, model
        self.out, self.seq_len = Path(cfg.out), cfg.seq_len
        self.directory = RunDirectory(self.out, cfg.inputs(), command=cfg.command, writer=runtime.main)
        self.amp_dtype = autocast_dtype(cfg.precision, runtime.device)
        self.context = RunContext(
            runtime=runtime, vocab_size=model.config.vocab_size, seq_len=self.seq_len,
            batch_size=cfg.batch_size, seed=cfg.seed, amp_dtype=self.amp_dtype,
            frozen_start=lambda: model.frozen_start(self.amp_dtype or torch.float32),
        )  # fmt: skip
        self.objective = task.attach(self.context)
        self.sharded = cfg.fsdp and runtime.world_size > 1
        if self.sharded:
            shard_model(model.module)  # before the optimizer: sharding replaces the parameters
        self.loader = task.train_batches()
        staged = task.micro_batches_at(0) is not None  # a staged task sets each step's micro-batches
        self.micro_batches = task.micro_batches_at(0) or cfg.micro_batches(self.seq_len, runtime.world_size)
        rows = cfg.batch_size * self.micro_batches * runtime.world_size
        self.max_steps = task.max_steps(rows)
        self.batch = {
            "rows": cfg.batch_size,
            "seq_len": self.seq_len,
            "micro_batches": self.micro_batches,
            "ranks": runtime.world_size,
            "tokens_per_step": rows * self.seq_len,
            "steps": self.max_steps,
        }
        self.optimizer = build_optimizer(model.module, cfg, runtime.device, total_steps=self.max_steps)
        self.scheduler = build_schedule(self.optimizer, cfg, self.max_steps)
        size = "stages of their own batch sizes" if staged else f"{rows * self.seq_len:,} tokens"
        runtime.log(f"{self.max_steps} steps of {size}; {describe(self.optimizer)}")
        fp16 = self.amp_dtype == torch.float16 and runtime.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

        def replica() -> tuple[nn.Module, torch.optim.Optimizer]:
            copy = SmallLM(model.config)
            return copy, build_optimizer(copy, cfg, torch.device("cpu"))

        self.checkpointer = Checkpointer(self.out, runtime, cfg.keep_last, replica if self.sharded else None)
        self.state = TrainingState(step=0, tokens_seen=0)
        self.new_rows: NewRowsOnly | None = None  # while a stage trains only the rows of new tokens
        self.task_evaluation = TaskEvaluation(cfg, task.tokenizer, runtime, self.amp_dtype)
        self.saved_at: int | None = None  # the step of the last checkpoint this trainer wrote
        self.validated_at: int | None = None  # the step of its last validation
        if cfg.resume:
            peaks = [group["initial_lr"] for group in self.optimizer.param_groups]
            self.state = self.checkpointer.resume(
                model, self.optimizer, self.scheduler, self.scaler, self.loader, settings=asdict(cfg)
            )
            restore_schedule(self.optimizer, self.scheduler, peaks, self.state.step)
        self.net = wrap_model(model.module, runtime, sharded=self.sharded, compile=cfg.compile)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        """Called with each metrics line as it is logged, in the training thread (rank 0)."""
        self.stop_requested = threading.Event()
        self.progress_bar = True  # the tqdm bar on stderr (a notebook dashboard shows its own)
        self.flops_per_token = flops_per_token(model.config, self.seq_len)
        self.peak = peak_flops(runtime.device, self.amp_dtype or torch.float32)
        if self.peak is None and runtime.device.type == "cuda":
            warn_unknown_device(torch.cuda.get_device_name(runtime.device))  # MFU is left out
        elif runtime.device.type == "cpu":  # against the matmul peak measured on this machine
            self.peak = measured_peak_flops(self.amp_dtype or torch.float32)

    def request_stop(self) -> None:
        """Asks :meth:`fit` (running in another thread) to stop after the step under way, with a checkpoint
        there; safe to call at any time, once or more. One process only: under torchrun every rank would
        have to be asked at the same step."""
        self.stop_requested.set()

    def run_config(self) -> dict[str, Any]:
        """What ``config.json`` of the run and of each checkpoint holds."""
        sections = {**self.task.run_config(), **self.model.run_config()}
        return {"train": asdict(self.cfg), "model": asdict(self.model.config), "batch": self.batch, **sections}

    # ----- one step -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the step's micro-batches; returns the objective's metrics."""
        micro_batches = self.task.micro_batches_at(self.state.step) or self.micro_batches
        batches = [next(self.loader) for _ in range(micro_batches)]
        counts = torch.stack([self.objective.count(b) for b in batches]).to(torch.float64).sum()
        inputs = torch.tensor(float(sum(b[0].numel() for b in batches)), dtype=torch.float64, device=counts.device)
        count, tokens = self.runtime.all_reduce(torch.stack([counts, inputs]))
        # DDP and FSDP average gradients over ranks; scaling by world size makes it a sum over ranks,
        # so the result is d(sum of all losses)/d(params) / (the count of the whole step).
        scale = (self.runtime.world_size / count.clamp(min=1.0)).to(torch.float32)
        stats = torch.stack(self.backward(batches, scale)).sum(dim=0)
        self.apply_gradients()
        self.state.tokens_seen += int(tokens)
        return self.objective.train_metrics(self.runtime.all_reduce(stats), count.to(stats.dtype))

    def autocast(self) -> Any:
        return torch.autocast(self.runtime.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward(self, batches: list[Batch], scale: torch.Tensor) -> list[torch.Tensor]:
        """The backward of each micro-batch's ``loss * scale``; DDP synchronises the gradients after the
        last one only. Returns the micro-batches' stats."""
        stats = []
        no_sync = getattr(self.net, "no_sync", None)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with no_sync() if (not last and no_sync is not None) else contextlib.nullcontext():
                with self.autocast():
                    loss, stat = self.objective.loss(self.net, batch)
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            stats.append(stat)
        return stats

    def apply_gradients(self) -> None:
        """Unscales, clips and checks the accumulated gradients, steps the optimizer and the schedule."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # The norm of the synchronised gradients (clipped when grad_clip > 0). A GradScaler skips
        # non-finite steps itself; without one, such a step would poison the weights.
        first = self.task.new_rows_at(self.state.step)
        if first is None:
            self.new_rows = None
        elif self.new_rows is None or self.new_rows.first != first:
            self.new_rows = NewRowsOnly(self.model.module, first)
        if self.new_rows is not None:
            self.new_rows.restrict_gradients()
        trainable = [p for p in self.model.module.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        if self.scaler is None and not torch.isfinite(norm):
            self.diverged(f"the gradient norm became {norm.item()}")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.new_rows is not None:
            self.new_rows.restore()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def first_step(self) -> dict[str, float]:
        """The first step; a compiled model that fails there (torch.compile reports most problems only
        when it first runs) is replaced by the plain one, from the same batch."""
        if not self.cfg.compile:
            return self.train_step()
        position = self.loader.state_dict()
        try:
            return self.train_step()
        except Exception as e:  # compilation raises many types
            warnings.warn(f"torch.compile failed here ({type(e).__name__}: {e}); training without it", stacklevel=2)
            self.net = getattr(self.net, "_orig_mod", self.net)
            self.optimizer.zero_grad(set_to_none=True)
            self.loader.load_state_dict(position)
            return self.train_step()

    def diverged(self, what: str) -> None:
        last = latest_checkpoint(self.out)
        if last is None:
            advice = "No checkpoint was saved before it: start again with a lower --lr or more --warmup-steps"
        else:
            advice = f"The last good checkpoint, {last}, is intact: resume from it with a lower --lr"
        raise TrainingError(f"{what} at step {self.state.step}; stopping. {advice}")

    # ----- validation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's validation metrics over the task's validation batches (all ranks)."""
        batches = self.task.validation_batches()
        if batches is None:
            return self.task_evaluation(self.model.module) if self.task_evaluation else {}
        n_batches = len(batches) if not self.cfg.eval_batches else min(len(batches), self.cfg.eval_batches)
        if self.sharded:
            # Every rank must run as many forwards as the others (each gathers the shards); ranks
            # with fewer rows run padding batches whose targets are all ignored.
            most = torch.tensor(n_batches, device=self.runtime.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            n_batches = int(most)
        x_pad = torch.zeros(1, self.seq_len, dtype=torch.long, device=self.runtime.device)
        padding = (x_pad, torch.full_like(x_pad, IGNORE_INDEX))
        it = iter(batches)
        sums = self.objective.evaluate(self.model.module, (next(it, padding) for _ in range(n_batches)))
        metrics = self.objective.validation_metrics(self.runtime.all_reduce(sums))
        if self.task_evaluation:  # the lm-eval tasks of --eval-tasks
            metrics.update(self.task_evaluation(self.model.module))
        return metrics

    def save(self, is_best: bool = False) -> None:
        if not all_finite(self.model.module):
            self.diverged("the weights are no longer finite")
        self.saved_at = self.state.step
        self.checkpointer.save(
            self.model, self.optimizer, self.scheduler, self.scaler, self.loader, self.state, self.run_config(),
            is_best=is_best,
        )  # fmt: skip

    # ----- the run ------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Trains to the last step and returns the last metrics and the sample. The run directory is
        locked meanwhile (see :mod:`smallm.run.layout`)."""
        self.directory.open(resume=self.cfg.resume, force=self.cfg.force)
        try:
            return self.fit_locked()
        finally:
            self.directory.close()

    def fit_locked(self) -> dict[str, Any]:
        if self.runtime.main:
            if self.cfg.resume and trim_metrics(self.out, self.state.step):
                self.runtime.log(f"metrics.jsonl: dropped the lines after step {self.state.step}, logged again now")
            write_run_config(self.out, self.run_config())
            if not has_tokenizer(self.out):
                self.task.tokenizer.save(self.out)  # the run directory is usable without the data
        logger = MetricsLogger(
            self.out, total_steps=self.max_steps, start_step=self.state.step, tensorboard=self.cfg.tensorboard,
            wandb_project=self.cfg.wandb_project, run_config=self.run_config(), enabled=self.runtime.main,
            listeners=self.listeners, progress_bar=self.progress_bar,
        )  # fmt: skip
        self.model.module.train()
        last: dict[str, Any] = {}
        try:
            last = self.loop(logger)
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(
                f"CUDA ran out of memory ({e}). Try a smaller --batch-size with more --grad-accum, "
                "--activation-checkpointing, a shorter --seq-len, or bf16 precision"
            ) from e
        except CheckpointError as e:
            raise TrainingError(str(e)) from e
        finally:
            logger.close()
        return self.finish(logger, last)

    def loop(self, logger: MetricsLogger) -> dict[str, Any]:
        """Steps to the end: each step trains, then logs, validates and saves when they are due."""
        last: dict[str, Any] = {}
        start_step, self.since_log = self.state.step, (0.0, self.state.tokens_seen)
        while self.state.step < self.max_steps:
            if self.stop_requested.is_set():
                # At start_step there is nothing new: a fresh run's step 0, or the checkpoint it resumed from.
                return self.stop_here(last, saved=self.state.step in (start_step, self.saved_at))
            started = time.perf_counter()
            try:
                stats = self.train_step() if self.state.step > start_step else self.first_step()
            except DataExhausted as e:  # --no-repeat: the run ends cleanly at the last whole step
                self.runtime.log(f"{e}: stopping after step {self.state.step}")
                self.max_steps = self.state.step  # this step is the last: everything due at the end is due now
                if self.state.step > start_step:
                    last = self.after_step(logger, stats, last)
                break
            self.since_log = (self.since_log[0] + time.perf_counter() - started, self.since_log[1])
            self.state.step += 1
            if not math.isfinite(stats["loss"]):
                self.diverged(f"the loss became {stats['loss']}")
            last = self.after_step(logger, stats, last)
        return last

    def after_step(self, logger: MetricsLogger, stats: dict[str, float], last: dict[str, Any]) -> dict[str, Any]:
        """What is due after the step just taken (each at most once a step): its metrics line, validation
        and a checkpoint. Returns the last metrics."""
        step = self.state.step
        if self.due(self.cfg.log_every) and last.get("step") != step:
            last = self.log_step(logger, stats)
        if (self.due(self.cfg.eval_every) or self.task.stage_ends_at(step)) and self.validated_at != step:
            self.validated_at = step
            metrics = self.evaluate()
            is_best = self.record_validation(logger, metrics)
            last.update(metrics)
        else:
            is_best = False
        if (self.due(self.cfg.checkpoint_every) or is_best) and self.saved_at != step:
            self.save(is_best=is_best)
        return last

    def stop_here(self, last: dict[str, Any], *, saved: bool) -> dict[str, Any]:
        """Ends the loop early at a stop request: a checkpoint of this step (unless one was just written),
        from which ``--resume`` continues exactly."""
        if not saved:
            self.save()
        self.runtime.log(f"stopped at step {self.state.step} of {self.max_steps}; --resume continues from there")
        return {**last, "stopped_at": self.state.step}

    def due(self, every: int) -> bool:
        """Whether something done every ``every`` steps (0: never but at the end) is due at this step."""
        return bool(every and self.state.step % every == 0) or self.state.step == self.max_steps

    def log_step(self, logger: MetricsLogger, stats: dict[str, float]) -> dict[str, Any]:
        """Logs the step's metrics with the learning rate, and the tokens/s and MFU of the training steps
        since the last line (validation and checkpoints left out)."""
        seconds, tokens = self.since_log
        tokens_per_s = (self.state.tokens_seen - tokens) / max(seconds, 1e-9)
        line = {"step": self.state.step, **stats, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s}
        util = mfu(self.flops_per_token, tokens_per_s, self.peak)
        if util is not None:
            line["mfu"] = util
        self.since_log = (0.0, self.state.tokens_seen)
        logger.log(line)
        return line

    def record_validation(self, logger: MetricsLogger, metrics: dict[str, float]) -> bool:
        """Logs validation metrics; returns whether they are the best so far (by validation loss)."""
        if not metrics:
            return False
        logger.log({"step": self.state.step, **metrics})
        best = self.state.best_val_loss
        if "val_loss" not in metrics or (best is not None and metrics["val_loss"] >= best):
            return False
        self.state.best_val_loss = metrics["val_loss"]
        return True

    def finish(self, logger: MetricsLogger, last: dict[str, Any]) -> dict[str, Any]:
        """After the last step: the plot, the model part's extra files and the sample (rank 0)."""
        model: nn.Module | None = self.model.module
        if self.sharded:  # generation runs on rank 0 alone, so on a gathered copy
            gathered = self.checkpointer.gathered(self.model.module, self.optimizer)
            model = gathered[0] if gathered is not None else None
        last["out"] = str(self.out)
        if self.runtime.main and model is not None:
            logger.plot()
            last["sample"] = self.task.sample(model)
            self.model.finish(self.out, self.runtime)
        return last


def seed_everything(seed: int) -> None:
    """Seeds torch and numpy's global generator (the model's initialisation draws from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
