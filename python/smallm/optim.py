"""Optimizers and learning-rate schedules: how a run turns gradients into steps.

The default for pretraining is Muon (Jordan et al. 2024; ``torch.optim.Muon``): the 2-D weight matrices
inside the blocks take orthogonalised momentum updates (Newton-Schulz, 5 steps), while the embedding,
``lm_head`` and the norm gains, which Muon does not suit, take AdamW, each at its own learning rate
(:class:`MuonWithAdamW`, one optimizer to the trainer). The rates transfer across sizes instead of coming
from a table per preset (:func:`learning_rates`): Muon's matrix rate is width-free (its update is scaled
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
from torch import nn

from smallm.config import FinetuneConfig, RunConfig

__all__ = [
    "LearningRates",
    "MuonWithAdamW",
    "build_optimizer",
    "build_schedule",
    "cosine_with_warmup",
    "describe",
    "has_bitsandbytes",
    "learning_rates",
    "param_groups",
    "resolve_optimizer",
    "restore_schedule",
    "warmup_stable_decay",
]

REFERENCE_WIDTH = 768
"""The width at which the base rates below were tuned (nanochat's d12)."""
MATRIX_LR, EMBEDDING_LR, HEAD_LR, NORM_LR = 0.02, 0.2, 0.004, 0.02
ADAMW_LR = 6e-4
"""AdamW's rate for a 768-wide model (GPT-2 small's); it scales as 1 / width (muP's rule for Adam)."""
FINETUNE_LR = {("sft", False): 2e-5, ("sft", True): 2e-4, ("dpo", False): 1e-6, ("dpo", True): 2e-5}
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


def learning_rates(cfg: RunConfig, optimizer: str, width: int) -> LearningRates:
    """The peak rates of each group under ``optimizer`` (``muon``, ``adamw``...) for a model of
    ``width``; the ones ``cfg`` gives win."""
    if optimizer == "muon":
        adam = math.sqrt(REFERENCE_WIDTH / width)
        return LearningRates(
            matrix=cfg.lr if cfg.lr is not None else MATRIX_LR,
            embedding=cfg.embedding_lr if cfg.embedding_lr is not None else EMBEDDING_LR * adam,
            head=cfg.head_lr if cfg.head_lr is not None else HEAD_LR * adam,
            norm=cfg.norm_lr if cfg.norm_lr is not None else NORM_LR * adam,
        )
    if cfg.lr is not None:
        lr = cfg.lr
    elif isinstance(cfg, FinetuneConfig):
        lr = FINETUNE_LR[(cfg.method, cfg.lora_r > 0)]
    else:
        lr = ADAMW_LR * REFERENCE_WIDTH / width
    return LearningRates(lr, lr, lr, lr)


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


def resolve_optimizer(cfg: RunConfig, device: torch.device, quantized: bool = False, adapters: bool = False) -> str:
    """The optimizer ``auto`` stands for: Muon for pretraining (AdamW under FSDP, which shards the
    matrices Muon needs whole), AdamW for fine-tuning and adapters, paged AdamW under QLoRA on CUDA."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    if quantized and device.type == "cuda" and has_bitsandbytes():
        return "paged-adamw"
    if isinstance(cfg, FinetuneConfig) or adapters or cfg.fsdp:
        return "adamw"
    return "muon"


def build_optimizer(
    model: nn.Module,
    cfg: RunConfig,
    device: torch.device,
    *,
    quantized: bool = False,
    total_steps: int = 3 * MOMENTUM_WARMUP,
) -> torch.optim.Optimizer:
    """The optimizer for ``model``'s trainable parameters that ``cfg.optimizer`` names (see the module
    docstring) for a run of ``total_steps``."""
    adapters = any("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    choice, cuda = resolve_optimizer(cfg, device, quantized, adapters), device.type == "cuda"
    if choice == "muon":
        if adapters:
            raise ValueError("--optimizer muon: LoRA adapters are trained with AdamW; drop --optimizer or use adamw")
        if cfg.fsdp:
            raise ValueError(
                "--optimizer muon orthogonalises whole weight matrices, which --fsdp shards across ranks: "
                "use DDP (no --fsdp) with Muon, or --optimizer adamw with --fsdp"
            )
        return _muon_with_adamw(model, cfg, learning_rates(cfg, choice, _width(model)), total_steps, cuda)
    groups = param_groups(model, cfg.weight_decay)
    lr = learning_rates(cfg, choice, _width(model)).matrix
    betas = (0.9 if cfg.beta1 is None else cfg.beta1, cfg.beta2)
    if choice == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=cuda)
    if not cuda or not has_bitsandbytes():
        raise ValueError("--optimizer paged-adamw needs CUDA and the bitsandbytes package")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW(groups, lr=lr, betas=betas)


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return config.n_embd if config is not None else REFERENCE_WIDTH


def _muon_with_adamw(
    model: nn.Module, cfg: RunConfig, rates: LearningRates, total_steps: int, cuda: bool
) -> MuonWithAdamW:
    matrices, embedding, head, norms = [], [], [], []
    for name, p in model.named_parameters():  # a tied lm_head comes once, as the embedding
        if not p.requires_grad:
            continue
        if p.dim() == 2 and ".layers." in f".{name}":
            matrices.append(p)
        elif name.endswith("embed_tokens.weight"):
            (head if getattr(model.config, "tie_embeddings", False) else embedding).append(p)
        elif name.endswith(("lm_head.weight", "score.weight")):  # a reward model's head is an output layer too
            head.append(p)
        else:
            norms.append(p)
    muon = torch.optim.Muon(matrices, lr=rates.matrix, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    adam_groups = [
        {"params": ps, "lr": lr, "weight_decay": 0.0}
        for ps, lr in ((embedding, rates.embedding), (head, rates.head), (norms, rates.norm))
        if ps
    ]
    betas = (0.8 if cfg.beta1 is None else cfg.beta1, cfg.beta2)
    adamw = torch.optim.AdamW(adam_groups, betas=betas, eps=1e-10, fused=cuda)
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
