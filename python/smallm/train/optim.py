"""Optimizers and learning-rate schedules: how a run turns gradients into steps.

The default for pretraining is Muon (Jordan et al. 2024; ``torch.optim.Muon``'s update, with same-shape
matrices orthogonalised together, and shared out among the ranks under DDP:
:class:`smallm.train.muon.BatchedMuon`): the 2-D weight matrices inside the blocks take orthogonalised
momentum updates (Newton-Schulz, 5 steps), while the embedding, ``lm_head`` and the norm gains, which
Muon does not suit, take AdamW, each at its own learning rate
(:class:`MuonWithAdamW`, one optimizer to the trainer). The rates transfer across sizes instead of coming
from a table per preset (:func:`default_rates`): Muon's matrix rate is width-free (its update is scaled
by ``sqrt(max(1, rows / cols))``) and the AdamW rates shrink as ``1 / sqrt(width / 768)`` (nanochat's
rules). The same rates served the ``tiny`` preset at 4096 tokens per step (``benches/quality.py``) and
nanochat's 768-wide model at 2**19, so they are not scaled with the batch. Muon's momentum warms up
from 0.85 to its value over the first steps.

``--optimizer adamw``: AdamW everywhere (fused on CUDA), decay on the matrices and embeddings, not the
norms; ``paged-adamw``: bitsandbytes' paged AdamW, whose states page out to host memory (the default
under QLoRA on CUDA). Adapters (LoRA, QLoRA) always take AdamW.

Schedules (:func:`build_schedule`): warm-up, then warmup-stable-decay (constant, then a linear decay to
``min_lr_ratio`` of the peak over the last ``decay_fraction`` of the run; the default) or cosine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from smallm.model.layers import DecoderLayer, RMSNorm
from smallm.train.config import FinetuneConfig, RunConfig
from smallm.train.muon import BatchedMuon

__all__ = [
    "LearningRates",
    "MuonWithAdamW",
    "build_optimizer",
    "build_schedule",
    "cosine_with_warmup",
    "default_rates",
    "describe",
    "has_bitsandbytes",
    "param_groups",
    "parameter_groups",
    "resolve_optimizer",
    "restore_schedule",
    "warmup_stable_decay",
]

REFERENCE_WIDTH = 768
"""The width at which the base rates below were tuned (nanochat's d12)."""
MATRIX_LR, EMBEDDING_LR, HEAD_LR, NORM_LR = 0.02, 0.2, 0.004, 0.02
ADAMW_LR = 6e-4
"""AdamW's rate for a 768-wide model (GPT-2 small's); it scales as 1 / width (muP's rule for Adam)."""
FINETUNE_LR = {
    ("sft", False): 2e-5, ("sft", True): 2e-4, ("dpo", False): 1e-6, ("dpo", True): 2e-5,
    ("rm", False): 1e-5, ("rm", True): 1e-4,
}  # fmt: skip
"""AdamW's rates for fine-tuning by (method, LoRA): adapters start from zero and take larger steps."""
MOMENTUM_WARMUP = 300
"""Steps over which Muon's momentum rises from 0.85 to its value (at most a third of the run's)."""


def cosine_with_warmup(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, *, warmup: int, total: int, decay_fraction: float, min_ratio: float) -> float:
    """Multiplier at ``step``: linear warm-up, the peak, then a linear decay to ``min_ratio`` over the last
    ``decay_fraction`` of the ``total`` steps (reached at the last step)."""
    if step < warmup:
        return (step + 1) / warmup
    decay = max(1, round(decay_fraction * total))
    left = total - 1 - step
    if left >= decay:
        return 1.0
    return min_ratio + (1 - min_ratio) * max(0.0, left) / decay


@dataclass(frozen=True)
class LearningRates:
    """Peak learning rates per parameter group."""

    matrix: float
    """The matrices inside the blocks (Muon, or AdamW with ``--optimizer adamw``)."""
    embedding: float
    head: float
    """``lm_head`` (a tied embedding takes this rate: it is the output layer too)."""
    norm: float


def default_rates(optimizer: str, width: int, finetune: tuple[str, bool] | None = None) -> LearningRates:
    """The peak rates of each group under ``optimizer`` (``muon``, ``adamw``...) for a model of ``width``:
    Muon's width-free matrix rate and AdamW's rates scaled by ``1 / sqrt(width / 768)`` beside it; AdamW alone
    at ``6e-4 x 768 / width``; fine-tuning (``finetune``: the method and whether LoRA) at its own rate."""
    if optimizer == "muon":
        adam = math.sqrt(REFERENCE_WIDTH / width)
        return LearningRates(MATRIX_LR, EMBEDDING_LR * adam, HEAD_LR * adam, NORM_LR * adam)
    lr = FINETUNE_LR[finetune] if finetune is not None else ADAMW_LR * REFERENCE_WIDTH / width
    return LearningRates(lr, lr, lr, lr)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter of ``model`` by what it is, from the type of the module that holds it:
    ``matrix`` (a linear layer's weight inside a block, LoRA's adapters included), ``embedding``, ``head``
    (a linear layer's weight outside the blocks: ``lm_head``, a reward model's ``score``, and a tied
    embedding, which is the output layer too) and ``vector`` (norm gains and biases). Raises ``TypeError``
    naming a parameter that none of these describes, and checks that every trainable parameter is in
    exactly one group."""
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "head": [], "vector": []}
    in_blocks = {id(p) for block in model.modules() if isinstance(block, DecoderLayer) for p in block.parameters()}
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    placed: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in placed:
                continue
            if isinstance(module, RMSNorm) or (isinstance(module, nn.Linear) and name == "bias"):
                role = "vector"
            elif isinstance(module, nn.Embedding):
                role = "head" if tied else "embedding"
            elif isinstance(module, nn.Linear):
                role = "matrix" if id(p) in in_blocks else "head"
            else:
                where = f"{module_name}.{name}".lstrip(".")
                raise TypeError(f"{where} (a parameter of a {type(module).__name__}) belongs to no optimizer group")
            groups[role].append(p)
            placed.add(id(p))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for ps in groups.values() for p in ps]
    if len(grouped) != len(set(grouped)) or set(grouped) != trainable:
        raise RuntimeError("the optimizer groups do not hold every trainable parameter exactly once")
    return groups


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups of the trainable parameters: the matrices, embeddings and heads with weight decay,
    the vectors (norms, biases) without."""
    groups = parameter_groups(model)
    decay = groups["matrix"] + groups["embedding"] + groups["head"]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": groups["vector"], "weight_decay": 0.0}]


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError where its binaries do not load
        return False
    return True


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the block matrices and AdamW for the rest, stepping together: one optimizer to the
    trainer, the schedule and the grad scaler, with the two optimizers' groups as its ``param_groups``.
    Muon's momentum follows :meth:`momentum_at` of the steps taken, so a resumed run continues it."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW, momentum_warmup: int) -> None:
        params = [p for opt in (muon, adamw) for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.muon, self.adamw, self.momentum_warmup = muon, adamw, momentum_warmup
        self.param_groups = [*muon.param_groups, *adamw.param_groups]  # the same dicts: the schedule reaches both
        self.momentum = muon.param_groups[0]["momentum"] if muon.param_groups else 0.95
        self.steps = 0

    def momentum_at(self, step: int) -> float:
        if step >= self.momentum_warmup:
            return self.momentum
        return 0.85 + (self.momentum - 0.85) * step / self.momentum_warmup

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.muon.param_groups:
            group["momentum"] = self.momentum_at(self.steps)
        self.muon.step()
        self.adamw.step()
        self.steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state) != {"muon", "adamw", "steps"}:
            raise ValueError(f"not the state of Muon with AdamW (it has {sorted(state)}): another --optimizer?")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        # Loading gives the two optimizers new group dicts: share those, or the schedule would move stale ones.
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]
        self.steps = int(state["steps"])


def resolve_optimizer(cfg: RunConfig, device: torch.device) -> str:
    """The optimizer ``auto`` stands for: Muon for pretraining (AdamW under FSDP, which shards the
    matrices Muon needs whole), AdamW for fine-tuning and adapters, paged AdamW under QLoRA on CUDA."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    finetune = isinstance(cfg, FinetuneConfig)
    if finetune and cfg.quantize == "nf4" and device.type == "cuda" and has_bitsandbytes():
        return "paged-adamw"
    if finetune or cfg.fsdp:
        return "adamw"
    return "muon"


def build_optimizer(
    model: nn.Module, cfg: RunConfig, device: torch.device, *, total_steps: int = 3 * MOMENTUM_WARMUP
) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optimizer`` names over ``model``'s trainable parameters, at ``cfg``'s peak rates,
    for a run of ``total_steps``. ``cfg`` is resolved (:func:`smallm.train.resolve.resolve`): the optimizer
    and the rates are the ones the run records."""
    if cfg.optimizer == "auto" or cfg.lr is None:
        raise ValueError("build_optimizer takes resolved settings: smallm.train.resolve.resolve(cfg) first")
    cuda = device.type == "cuda"
    if cfg.optimizer == "muon":
        if isinstance(cfg, FinetuneConfig) and cfg.lora_r:
            raise ValueError("--optimizer muon: LoRA adapters are trained with AdamW; drop --optimizer or use adamw")
        if cfg.fsdp:
            raise ValueError(
                "--optimizer muon orthogonalises whole weight matrices, which --fsdp shards across ranks: "
                "use DDP (no --fsdp) with Muon, or --optimizer adamw with --fsdp"
            )
        return _muon_with_adamw(model, cfg, total_steps, cuda)
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, fused=cuda)
    if not cuda or not has_bitsandbytes():
        raise ValueError("--optimizer paged-adamw needs CUDA and the bitsandbytes package")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW(groups, lr=cfg.lr, betas=betas)


def _muon_with_adamw(model: nn.Module, cfg: RunConfig, total_steps: int, cuda: bool) -> MuonWithAdamW:
    groups = parameter_groups(model)
    # Under DDP (Muon refuses FSDP) the ranks hold the same matrices and gradients: they share the work.
    ranks = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    muon = BatchedMuon(
        groups["matrix"], lr=cfg.lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay, process_group=ranks
    )
    rates = ((groups["embedding"], cfg.embedding_lr), (groups["head"], cfg.head_lr), (groups["vector"], cfg.norm_lr))
    adam_groups = [{"params": ps, "lr": lr, "weight_decay": 0.0} for ps, lr in rates if ps]
    adamw = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=1e-10, fused=cuda)
    return MuonWithAdamW(muon, adamw, momentum_warmup=min(MOMENTUM_WARMUP, total_steps // 3))


def restore_schedule(optimizer: torch.optim.Optimizer, scheduler: Any, peaks: list[float], step: int) -> None:
    """After a checkpoint was loaded into ``optimizer`` and ``scheduler``: the run's configured peak rates
    (``peaks``, so that ``--resume --lr X`` takes X) and the schedule's rate for ``step``, computed as an
    uninterrupted run computes it (so a longer ``--max-steps`` moves the decay, from the very next step)."""
    scheduler.base_lrs = list(peaks)
    for group, peak in zip(optimizer.param_groups, peaks):
        group["initial_lr"] = peak
    scheduler.last_epoch = step - 1
    scheduler.step()


def describe(optimizer: torch.optim.Optimizer) -> str:
    """One line naming the optimizer and each group's size and peak rate, for the run's log."""

    def groups(opt: torch.optim.Optimizer) -> str:
        sizes = [(sum(p.numel() for p in g["params"]), g.get("initial_lr", g["lr"])) for g in opt.param_groups]
        return ", ".join(f"{n / 1e6:.2f}M at {lr:.3g}" for n, lr in sizes)

    if isinstance(optimizer, MuonWithAdamW):
        return f"Muon: {groups(optimizer.muon)} (the block matrices); AdamW: {groups(optimizer.adamw)}"
    return f"{type(optimizer).__name__}: {groups(optimizer)}"


def build_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int) -> Any:
    """The configured schedule over ``total_steps``, as a ``LambdaLR`` on ``optimizer`` (every group's
    rate is its peak times the same multiplier)."""

    def multiplier(step: int) -> float:
        if cfg.schedule == "cosine":
            return cosine_with_warmup(step, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio)
        return warmup_stable_decay(
            step, warmup=cfg.warmup_steps, total=total_steps, decay_fraction=cfg.decay_fraction,
            min_ratio=cfg.min_lr_ratio,
        )  # fmt: skip

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
