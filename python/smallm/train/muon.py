"""Muon with the orthogonalisation batched over matrices of one shape.

:class:`BatchedMuon` is ``torch.optim.Muon``: the same constructor, parameter groups and state (each
matrix's ``momentum_buffer``), so a state dict of one loads into the other, and the same update (Nesterov
momentum, Newton-Schulz orthogonalisation with torch's quintic coefficients, decoupled weight decay, the
learning rate adjusted by the matrix's shape as ``adjust_lr_fn`` says). What changes is how the work is
done: torch orthogonalises one matrix at a time, a handful of small matmuls each; here every matrix of
one shape in a group (a model's query projections, its MLP matrices...) is stacked and orthogonalised at
once with batched matmuls (``baddbmm``), a few large calls instead of many small ones.

The iteration runs in bfloat16, as torch's does, so the update agrees with torch's to bfloat16's rounding
(the tests check it). On the CPU it was measured against float32 too (``benches/muon_step.py``): bfloat16
was twice as fast on the 2-core machine's AVX-512 cores.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchedMuon", "orthogonalize"]


def orthogonalize(updates: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype = torch.bfloat16) -> Tensor:  # fmt: skip
    """The Newton-Schulz orthogonalisation of each matrix of ``updates`` (matrices x rows x columns), as
    ``torch.optim.Muon`` computes it for one: scaled to unit Frobenius norm, then ``steps`` quintic
    iterations in ``dtype`` on the wide orientation."""
    a, b, c = coefficients
    x = updates.to(dtype=dtype, copy=True)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.transpose(-2, -1)
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, polynomial, x, beta=a)
    return x.transpose(-2, -1) if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The learning rate of a matrix of ``shape``, as ``torch.optim.Muon`` adjusts it."""
    rows, columns = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / columns))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, columns))
    elif adjust_lr_fn == "spectral_unclamped":
        ratio = math.sqrt(rows / columns)
    else:
        ratio = 1.0
    return lr * ratio


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with same-shape matrices orthogonalised together (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            by_shape: dict[tuple[Any, ...], list[tuple[Tensor, Tensor]]] = defaultdict(list)
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse or torch.is_complex(param):
                    raise ValueError("Muon takes dense real matrices")
                if param.grad.ndim != 2:
                    raise ValueError("Param gradient must be a 2D matrix")
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape[(tuple(param.shape), param.device, param.dtype)].append((param, update))
            for (shape, _, _), items in by_shape.items():
                stacked = torch.stack([update for _, update in items])
                orthogonal = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
                rate = adjusted_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                params = [param for param, _ in items]
                torch._foreach_mul_(params, 1 - lr * decay)
                torch._foreach_add_(params, list(orthogonal.to(params[0].dtype).unbind(0)), alpha=-rate)
        return loss
