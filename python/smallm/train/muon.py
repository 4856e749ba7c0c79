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

Under DDP (``process_group``: the ranks that hold the same matrices and the same averaged gradients) the
orthogonalisation is shared out as in Keller Jordan's and nanochat's distributed Muon: of the ``n``
matrices of one shape, rank ``r`` orthogonalises the ``r``-th block of ``ceil(n / world)`` consecutive ones
(in parameter order, the same on every rank), and an all-gather of the bfloat16 results gives every rank
every matrix's update, so all ranks apply the same updates. Each rank still keeps every momentum buffer
(a cheap ``lerp``), so the state dict is the single-process one, whatever the number of ranks. The
gathers run asynchronously while the next shape is orthogonalised.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["BatchedMuon", "orthogonalize", "orthogonalize_shared"]


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


def orthogonalize_shared(
    updates: list[Tensor], coefficients: tuple[float, float, float], steps: int, eps: float,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, dist.Work]:  # fmt: skip
    """Starts the orthogonalisation of ``updates`` (matrices of one shape) shared over ``process_group``'s
    ranks: this rank orthogonalises its block of ``ceil(n / world)`` of them and an asynchronous
    all-gather assembles every rank's block. Returns the bfloat16 result (its first ``n`` matrices, once
    the returned work is waited on; padded to a multiple of the world size) and the work."""
    world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
    per_rank = -(-len(updates) // world)
    mine = updates[rank * per_rank : (rank + 1) * per_rank]
    first = updates[0]
    share = torch.zeros((per_rank, *first.shape), dtype=torch.bfloat16, device=first.device)
    if mine:
        share[: len(mine)] = orthogonalize(torch.stack(mine), coefficients, steps, eps)
    gathered = torch.empty((per_rank * world, *first.shape), dtype=torch.bfloat16, device=first.device)
    work = dist.all_gather_into_tensor(gathered, share, group=process_group, async_op=True)
    return gathered, work


def apply_updates(params: list[Tensor], orthogonal: Tensor, decay: float, rate: float) -> None:
    """Muon's step on ``params`` from their orthogonalised updates (the first ``len(params)`` matrices of
    ``orthogonal``): decoupled weight decay (``decay``: the rate times the decay), then ``-rate`` times each."""
    updates = list(orthogonal[: len(params)].to(params[0].dtype).unbind(0))
    torch._foreach_mul_(params, 1 - decay)
    torch._foreach_add_(params, updates, alpha=-rate)


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with same-shape matrices orthogonalised together (see the module docstring).
    ``process_group``: the DDP ranks to share the orthogonalisation among (every rank of it must step
    together, with the same parameters and gradients); None, or a group of one, orthogonalises all here."""

    def __init__(self, params: Any, *args: Any, process_group: dist.ProcessGroup | None = None, **kw: Any) -> None:
        super().__init__(params, *args, **kw)
        shared = process_group is not None and dist.get_world_size(process_group) > 1
        self.process_group = process_group if shared else None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)  # a pickled optimizer comes back unshared

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
            iteration = (group["ns_coefficients"], group["ns_steps"], group["eps"])
            gathering = []
            for (shape, _, _), items in by_shape.items():
                params, updates = [param for param, _ in items], [update for _, update in items]
                rate = adjusted_lr(lr, group["adjust_lr_fn"], torch.Size(shape))
                if self.process_group is None:
                    apply_updates(params, orthogonalize(torch.stack(updates), *iteration), lr * decay, rate)
                else:
                    orthogonal, work = orthogonalize_shared(updates, *iteration, self.process_group)
                    gathering.append((params, orthogonal, work, rate))
            for params, orthogonal, work, rate in gathering:
                work.wait()
                apply_updates(params, orthogonal, lr * decay, rate)
        return loss
