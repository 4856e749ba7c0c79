"""Optimizers and learning-rate schedules: how a run turns gradients into steps.

* :func:`build_optimizer`: AdamW (fused on CUDA), or bitsandbytes' paged AdamW, whose states page out to
  host memory under pressure (the default under QLoRA on CUDA, where the base is 4-bit and memory is
  the constraint). Weight decay goes to the matrices (embeddings included), not to the norms.
* :func:`build_schedule`: linear warm-up from 0 to the peak, then cosine decay to ``min_lr_ratio`` of it
  at the last step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from smallm.config import RunConfig

__all__ = ["build_optimizer", "build_schedule", "cosine_with_warmup", "has_bitsandbytes", "param_groups"]


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


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError where its binaries do not load
        return False
    return True


def build_optimizer(
    model: nn.Module, cfg: RunConfig, device: torch.device, quantized: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names for ``model``'s trainable parameters; ``auto`` is paged
    AdamW for a ``quantized`` (QLoRA) model on CUDA when bitsandbytes is installed, else AdamW."""
    choice, cuda = cfg.optimizer, device.type == "cuda"
    if choice == "auto":
        choice = "paged-adamw" if cuda and quantized and has_bitsandbytes() else "adamw"
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if choice == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.peak_lr(), betas=betas, fused=cuda)
    if not cuda or not has_bitsandbytes():
        raise ValueError("--optimizer paged-adamw needs CUDA and the bitsandbytes package")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW(groups, lr=cfg.peak_lr(), betas=betas)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    """The warm-up then cosine schedule over ``total_steps``, as a ``LambdaLR`` on ``optimizer``."""

    def multiplier(step: int) -> float:
        return cosine_with_warmup(step, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
