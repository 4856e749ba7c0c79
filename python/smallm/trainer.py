"""The pretraining loop: shards in, checkpoints, metrics and a sample out.

One optimizer step: ``grad_accum`` micro-batches per rank; the loss of each is summed over its target
tokens and divided by the number of target tokens of *all* micro-batches on *all* ranks, so the
gradient is the mean over every token of the step (not a mean of per-micro-batch means). AdamW
(betas 0.9/0.95, decay on 2-D weights only, fused on CUDA), linear warm-up then cosine decay to
``min_lr_ratio`` of the peak, the global gradient norm clipped after synchronisation. Mixed precision
by autocast (bf16, or fp16 with a GradScaler) over fp32 weights. Under torchrun: DDP, or FSDP2.
Checkpoints (see :mod:`smallm.checkpoint`) hold everything needed to resume bitwise-identically.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from smallm.checkpoint import (
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from smallm.config import TrainConfig
from smallm.data import ShardSet, TokenLoader, ValidationLoader
from smallm.distributed import all_finite, gather_to_replica, scatter_from_replica, setup_runtime, shard_model
from smallm.evaluate import byte_length_table, loss_sums, metrics_from_sums
from smallm.memory import mfu, peak_flops, warn_unknown_device
from smallm.model import ModelConfig, SmallLM
from smallm.runs import read_config, resolve_checkpoint
from smallm.tokenizer import Tokenizer


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says what to do)."""


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None: plain fp32)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: matrices (embeddings included) with weight decay, the
    rest (norms) without."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (embeddings included), not on norms."""
    groups = param_groups(model, cfg.weight_decay)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=(cfg.beta1, cfg.beta2), fused=fused)


def model_config_for(cfg: TrainConfig, tokenizer: Tokenizer, init: Path | None = None) -> ModelConfig:
    """The preset with the run's overrides, or the shape of the ``init`` checkpoint; the vocabulary
    defaults to the tokenizer's, rounded up to a multiple of 64 for faster matmuls."""
    if init is not None:
        mc = ModelConfig(**read_config(init)["model"])
    else:
        overrides = dict(cfg.model)
        overrides.setdefault("vocab_size", -(-tokenizer.vocab_size // 64) * 64)
        mc = ModelConfig.preset(cfg.preset, **overrides)
    if mc.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size {mc.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}: "
            "ids past the embedding table would crash training; raise model.vocab_size"
        )
    return mc


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the loop; :meth:`fit` returns the summary."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.rt = setup_runtime(cfg.device)
        self.out = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
        self.tokenizer = self.setup_data()
        self.model_config = model_config_for(cfg, self.tokenizer, self.init)
        self.seq_len = cfg.seq_len or self.model_config.max_seq_len
        if self.seq_len > self.model_config.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context {self.model_config.max_seq_len}")
        self.amp_dtype = autocast_dtype(cfg.precision, self.rt.device)
        self.model = self.build_model()
        self.model.gradient_checkpointing = cfg.activation_checkpointing
        self.sharded = cfg.fsdp and self.rt.world_size > 1
        if self.sharded:
            shard_model(self.model)  # before the optimizer: sharding replaces the parameters
        self.loader = self.make_loader()  # before the schedule: fine-tuning counts its steps from the data
        self.optimizer = self.build_optimizer()
        schedule = lambda step: cosine_with_warmup(  # noqa: E731
            step, warmup=cfg.warmup_steps, total=cfg.max_steps, min_ratio=cfg.min_lr_ratio
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        fp16 = self.amp_dtype == torch.float16 and self.rt.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16) if fp16 else None
        self.state = TrainingState(step=0, tokens_seen=0, best_val_loss=None, loader={}, extra={})
        if cfg.resume:
            self._resume()
        self.net = self._wrap(self.model)
        # Bytes of text per id (0 for special tokens) turn a loss in nats per token into bits per byte.
        self.byte_lengths = byte_length_table(self.tokenizer, self.model_config.vocab_size, self.rt.device)
        self.flops_per_token = self.model.flops_per_token(self.seq_len)
        self.peak = peak_flops(self.rt.device, self.amp_dtype or torch.float32)
        if self.peak is None and self.rt.device.type == "cuda":
            warn_unknown_device(torch.cuda.get_device_name(self.rt.device))  # MFU is left out

    # ----- setup ----------------------------------------------------------------------------------

    def setup_data(self) -> Tokenizer:
        """Opens the training data and returns its tokenizer (here: a shard directory's splits)."""
        data = Path(self.cfg.data) if self.cfg.data else None
        if data is None or not data.is_dir():
            raise ValueError(f"--data {self.cfg.data}: not a directory; make one with smallm-tokenize CORPUS --out DIR")
        self.train_set = ShardSet.open(data, "train")
        val_set = ShardSet.open(data, "val")
        self.val_set = val_set if val_set.num_tokens > 0 else None
        return Tokenizer.load(data)

    def build_model(self) -> nn.Module:
        """The model to train, on the device: fresh, or with the weights of ``init_from``."""
        model = SmallLM(self.model_config)
        if self.init is not None and "lora" in read_config(self.init):
            from smallm.runs import load_model

            model = load_model(self.init)[0].train()  # the adapter merged into the base it names
            self.log(f"initialised from {self.init} merged into its base")
        elif self.init is not None:
            model.load_state_dict(load_weights(self.init))
            self.log(f"initialised from the weights of {self.init}")
        return model.to(self.rt.device)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.cfg, self.rt.device)

    def make_loader(self) -> Any:
        """The endless iterator of training batches, with ``state_dict``/``load_state_dict``."""
        return TokenLoader(
            self.train_set, self.cfg.batch_size, self.seq_len, mode=self.cfg.sampling, seed=self.cfg.seed,
            rank=self.rt.rank, world_size=self.rt.world_size, device=self.rt.device,
        )  # fmt: skip

    def run_config(self) -> dict[str, Any]:
        """What ``config.json`` of the run and of each checkpoint holds."""
        return {"train": asdict(self.cfg), "model": asdict(self.model_config)}

    def _resume(self) -> None:
        path = latest_checkpoint(self.out)
        if path is None:
            raise ValueError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; train without --resume first")
        if self.sharded:
            replica, replica_opt = self._replica()
            self.state, _ = load_checkpoint(path, replica, replica_opt, self.scheduler, self.scaler)
            scatter_from_replica(self.model, self.optimizer, replica, replica_opt)
        else:
            whole = self.checkpoint_weights() is None
            model = self.model if whole else None
            self.state, _ = load_checkpoint(path, model, self.optimizer, self.scheduler, self.scaler)
            if not whole:
                self.restore_weights(path)
        saved = self.state.loader
        if saved.get("world_size") != self.rt.world_size:
            raise ValueError(
                f"{path} was written by {saved.get('world_size')} process(es); resume it with as many "
                f"(this run has {self.rt.world_size}): each one continues its own part of the data"
            )
        self.loader.load_state_dict(saved["ranks"][self.rt.rank])
        self.log(f"resumed from {path} at step {self.state.step}")

    def _replica(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """An unsharded CPU copy of the model and its optimizer, for checkpoints of a sharded run."""
        replica = SmallLM(self.model_config)
        return replica, make_optimizer(replica, self.cfg, torch.device("cpu"))

    def _wrap(self, model: nn.Module) -> nn.Module:
        net: nn.Module = model
        if self.rt.world_size > 1 and not self.sharded:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # Frozen weights (a LoRA base) are loaded alike on every rank and never change: DDP need
            # not broadcast them, which it cannot do faithfully for a 4-bit tensor subclass.
            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.cfg.compile:
            try:
                net = torch.compile(net)
            except Exception as e:  # torch.compile raises many types where it cannot work
                warnings.warn(f"torch.compile is not available here ({e}); training without it", stacklevel=2)
        return net

    def log(self, message: str) -> None:
        if self.rt.main:
            print(message, file=sys.stderr)

    # ----- the loop -------------------------------------------------------------------------------

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.rt.world_size > 1:
            dist.all_reduce(t)
        return t

    def batch_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The summed loss of one micro-batch ``(x, y)`` or ``(x, y, segment_ids)``."""
        x, y, *rest = batch
        _, loss = self.net(x, y, reduction="sum", segment_ids=rest[0] if rest else None)
        return loss

    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns ``{"loss": mean loss per target token over all ranks}``."""
        cfg = self.cfg
        batches = [next(self.loader) for _ in range(cfg.grad_accum)]
        counts = torch.stack([b[1].ne(-100).sum() for b in batches]).to(torch.float32)
        total = self._all_reduce(counts.sum().clone())
        # DDP and FSDP average gradients over ranks; scaling by world size makes it a sum over ranks,
        # so the result is d(sum of all token losses)/d(params) / (all target tokens).
        scale = self.rt.world_size / total.clamp(min=1.0)

        def loss_of(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            loss = self.batch_loss(batch)
            return loss, loss.detach()

        loss_sum = torch.stack(self.backward_micro_batches(batches, scale, loss_of)).sum()
        self.apply_gradients()
        mean = (self._all_reduce(loss_sum) / total).item()
        self.state.tokens_seen += int(total.item())
        return {"loss": mean}

    def autocast(self) -> Any:
        return torch.autocast(self.rt.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def backward_micro_batches(self, batches: list[Any], scale: torch.Tensor, loss_of: Any) -> list[Any]:
        """For each micro-batch, ``loss, extra = loss_of(batch)`` (a summed loss, and what the step
        reports) under autocast, then the backward of ``loss * scale``; DDP synchronises the gradients
        after the last micro-batch only. Returns the extras."""
        extras = []
        no_sync = getattr(self.net, "no_sync", None)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with no_sync() if (not last and no_sync is not None) else contextlib.nullcontext():
                with self.autocast():
                    loss, extra = loss_of(batch)
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            extras.append(extra)
        return extras

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def apply_gradients(self) -> None:
        """Unscales, clips and checks the accumulated gradients, steps the optimizer and the schedule."""
        cfg = self.cfg
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # The norm of the synchronised gradients (clipped when grad_clip > 0). A GradScaler skips
        # non-finite steps itself; without one, such a step would poison the weights.
        norm = torch.nn.utils.clip_grad_norm_(self.trainable(), cfg.grad_clip or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
        if self.scaler is None and not torch.isfinite(norm):
            self.diverged(f"the gradient norm became {norm.item()}")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats per token), perplexity and bits per byte over the val split."""
        loader = self.validation_batches()
        if loader is None:
            return {}
        n_batches = len(loader) if not self.cfg.eval_batches else min(len(loader), self.cfg.eval_batches)
        if self.sharded:
            # Every rank must run as many forwards as the others (each gathers the shards); ranks
            # with fewer rows run padding batches whose targets are all ignored.
            most = torch.tensor(n_batches, device=self.rt.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            n_batches = int(most)
        x_pad = torch.zeros(1, self.seq_len, dtype=torch.long, device=self.rt.device)
        padding = (x_pad, torch.full_like(x_pad, -100))
        batches = iter(loader)
        sums = loss_sums(
            self.model, (next(batches, padding) for _ in range(n_batches)), self.byte_lengths, self.amp_dtype
        )
        metrics = metrics_from_sums(self._all_reduce(sums))
        if not metrics:
            return {}
        return {"val_loss": metrics["loss"], "val_ppl": metrics["perplexity"], "val_bpb": metrics["bits_per_byte"]}

    def validation_batches(self) -> Any:
        """One pass of validation batches (with ``len``), or None without validation data."""
        if self.val_set is None:
            return None
        return ValidationLoader(
            self.val_set, self.cfg.batch_size, self.seq_len, rank=self.rt.rank,
            world_size=self.rt.world_size, device=self.rt.device,
        )  # fmt: skip

    def _first_step(self) -> dict[str, float]:
        """The first step; a compiled model that fails there (torch.compile reports most problems
        only when it first runs) is replaced by the plain one, from the same batch."""
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
        raise TrainingError(
            f"{what} at step {self.state.step}; stopping. The last good checkpoint in {self.out / 'checkpoints'} "
            "is intact: resume from it with a lower --lr or more --warmup-steps"
        )

    def save(self, is_best: bool = False) -> None:
        if not all_finite(self.model):
            self.diverged("the weights are no longer finite")
        # Every rank reads its own part of the data, so the checkpoint keeps every rank's position.
        states: list[Any] = [self.loader.state_dict()]
        if self.rt.world_size > 1:
            states = [None] * self.rt.world_size
            dist.all_gather_object(states, self.loader.state_dict())
        self.state.loader = {"world_size": self.rt.world_size, "ranks": states}
        model, optimizer = self.model, self.optimizer
        if self.sharded:
            gathered = gather_to_replica(self.model, self.optimizer, self._replica, self.rt.rank)
            if gathered is not None:
                model, optimizer = gathered
        if self.rt.main:
            save_checkpoint(
                self.out, model, optimizer, self.scheduler, self.scaler, self.state, self.run_config(),
                keep_last=self.cfg.keep_last, is_best=is_best, weights=self.checkpoint_weights(),
            )  # fmt: skip
        if self.rt.world_size > 1:
            dist.barrier()

    def fit(self) -> dict[str, Any]:
        """Trains to ``max_steps`` and returns the last metrics."""
        from smallm.metrics import MetricsLogger

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rt.main:
            (self.out / "config.json").write_text(json.dumps(self.run_config(), indent=2) + "\n")
            if not (self.out / "tokenizer.json").exists():
                self.tokenizer.save(self.out)  # the run directory is usable without the data
        logger = MetricsLogger(self.out, cfg, enabled=self.rt.main, start_step=self.state.step)
        self.model.train()
        last: dict[str, Any] = {}
        t0, tokens0 = time.perf_counter(), self.state.tokens_seen
        start_step = self.state.step
        try:
            while self.state.step < cfg.max_steps:
                stats = self.train_step() if self.state.step > start_step else self._first_step()
                self.state.step += 1
                step = self.state.step
                if not math.isfinite(stats["loss"]):
                    self.diverged(f"the loss became {stats['loss']}")
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = time.perf_counter() - t0
                    tps = (self.state.tokens_seen - tokens0) / max(elapsed, 1e-9)
                    last = {"step": step, **stats, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps}
                    util = mfu(self.flops_per_token, tps, self.peak)
                    if util is not None:
                        last["mfu"] = util
                    t0, tokens0 = time.perf_counter(), self.state.tokens_seen
                    logger.log(last)
                evaluating = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
                is_best = False
                if evaluating:
                    metrics = self.evaluate()
                    if metrics:
                        logger.log({"step": step, **metrics})
                        best = self.state.best_val_loss
                        is_best = best is None or metrics["val_loss"] < best
                        if is_best:
                            self.state.best_val_loss = metrics["val_loss"]
                        last.update(metrics)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or is_best:
                    self.save(is_best=is_best)
        except torch.cuda.OutOfMemoryError as e:
            raise TrainingError(
                f"CUDA ran out of memory ({e}). Try a smaller --batch-size with more --grad-accum, "
                "--activation-checkpointing, a shorter --seq-len, or bf16 precision"
            ) from e
        except CheckpointError as e:
            raise TrainingError(str(e)) from e
        finally:
            logger.close()
        model: nn.Module | None = self.model
        if self.sharded:  # generation runs on rank 0 alone, so on a gathered copy
            gathered = gather_to_replica(self.model, self.optimizer, self._replica, self.rt.rank)
            model = gathered[0] if gathered is not None else None
        if self.rt.main and model is not None:
            logger.plot()
            last["sample"] = self.sample(model)
        return last

    def checkpoint_weights(self) -> dict[str, torch.Tensor] | None:
        """The tensors a checkpoint stores instead of the model's whole state dict (None: all of it)."""
        return None

    def restore_weights(self, checkpoint: Path) -> None:
        """Loads what :meth:`checkpoint_weights` stored (only called when it is not None)."""
        raise NotImplementedError

    def sample(self, model: nn.Module) -> str:
        """Text generated from ``sample_prompt`` (temperature 0.8, top-k 50)."""
        from smallm.generate import generate_text

        prompt = self.cfg.sample_prompt or ""
        return generate_text(model, self.tokenizer, prompt, max_new_tokens=self.cfg.sample_tokens, seed=0)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs one training job (one process of it under torchrun)."""
    return run_to_end(Trainer, cfg)


def run_to_end(kind: type[Trainer], cfg: Any) -> dict[str, Any]:
    """Builds a ``kind`` trainer and fits it; under torchrun, the ranks then leave the process group
    together (rank 0 may still be writing the plot and the sample, and a rank that tears its gloo
    connections down meanwhile can abort at exit)."""
    try:
        result = kind(cfg).fit()
        if dist.is_initialized():
            dist.barrier()
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Trainer", "TrainingError", "cosine_with_warmup", "run_to_end", "train"]
