"""Optimizers and schedules: Muon takes the block matrices and AdamW the rest, the rates scale with width
and batch, the schedules have their shapes, and the combined optimizer saves and restores exactly."""

from __future__ import annotations

import pytest
import torch
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.config import FinetuneConfig, TrainConfig
from smallm.train.optim import (
    MuonWithAdamW,
    build_optimizer,
    build_schedule,
    cosine_with_warmup,
    default_rates,
    parameter_groups,
    warmup_stable_decay,
)
from smallm.train.resolve import resolve_optimization
from torch import nn

CPU = torch.device("cpu")


def optimizer_of(model: SmallLM, cfg: object, **options: object) -> torch.optim.Optimizer:
    """The optimizer of ``cfg`` over ``model``, its settings resolved for that model as a run resolves them."""
    return build_optimizer(model, resolve_optimization(cfg, model.config, CPU), CPU, **options)


def tiny(tied: bool = True, **options: object) -> SmallLM:
    torch.manual_seed(0)
    return SmallLM(ModelConfig(vocab_size=128, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, tie_embeddings=tied,
                               **options))  # fmt: skip


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    lr = [cosine_with_warmup(s, warmup=10, total=100, min_ratio=0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert cosine_with_warmup(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)


def test_warmup_stable_decay_holds_the_peak_then_falls_linearly_to_the_floor() -> None:
    lr = [warmup_stable_decay(s, warmup=10, total=100, decay_fraction=0.4, min_ratio=0.05) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10:60] == [1.0] * 50  # stable until the last 40 steps
    decay = lr[59:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr[-1] == pytest.approx(0.05)  # the last step runs at the floor
    steps = [b - a for a, b in zip(decay, decay[1:])]
    assert max(steps) == pytest.approx(min(steps))  # linear


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_the_rest(tied: bool) -> None:
    model = tiny(tied, qk_norm=True)
    optimizer = optimizer_of(model, TrainConfig(optimizer="muon"))
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]]
    adamw = [[names[id(p)] for p in g["params"]] for g in optimizer.adamw.param_groups]
    assert sorted(muon) == sorted(n for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n)
    assert len(muon) == 2 * 7
    expected = [["model.embed_tokens.weight"]] if tied else [["model.embed_tokens.weight"], ["lm_head.weight"]]
    assert adamw[: len(expected)] == expected
    assert all(model.get_parameter(n).dim() == 1 for n in adamw[-1])  # the norm gains, QK-norms included
    every = muon + [n for group in adamw for n in group]
    assert sorted(every) == sorted(names.values())  # each trained parameter in exactly one group
    rates = default_rates("muon", 64)
    head = optimizer.adamw.param_groups[0 if tied else 1]["lr"]
    assert head == pytest.approx(rates.head)  # a tied embedding is the output layer too: the head's rate


def test_rates_scale_with_width_and_given_rates_win() -> None:
    base, wide = default_rates("muon", 768), default_rates("muon", 4 * 768)
    assert wide.matrix == base.matrix and wide.embedding == pytest.approx(base.embedding / 2)
    assert wide.head == pytest.approx(base.head / 2) and wide.norm == pytest.approx(base.norm / 2)
    model = ModelConfig(vocab_size=128, n_layer=2, n_embd=768, n_head=12)
    given = resolve_optimization(TrainConfig(optimizer="muon", lr=0.5, head_lr=0.25), model, CPU)
    assert (given.lr, given.head_lr, given.embedding_lr) == (0.5, 0.25, base.embedding)
    assert default_rates("adamw", 768).matrix == pytest.approx(6e-4)
    assert default_rates("adamw", 256).matrix == pytest.approx(1.8e-3)
    assert resolve_optimization(FinetuneConfig(lora_r=8), model, CPU).lr == pytest.approx(2e-4)
    adamw = resolve_optimization(TrainConfig(optimizer="adamw"), model, CPU)
    assert (adamw.lr, adamw.embedding_lr, adamw.beta1) == (pytest.approx(6e-4), None, 0.9)  # one rate for all


@pytest.mark.parametrize("method", ["sft", "dpo", "rm"])
@pytest.mark.parametrize("lora", [0, 8])
def test_every_kind_of_fine_tuning_has_a_default_rate(method: str, lora: int) -> None:
    from smallm.train.config import DPOConfig, RewardConfig

    cls = {"sft": FinetuneConfig, "dpo": DPOConfig, "rm": RewardConfig}[method]
    model = ModelConfig(vocab_size=128, n_layer=2, n_embd=64, n_head=4)
    resolved = resolve_optimization(cls(lora_r=lora), model, CPU)
    assert resolved.optimizer == "adamw" and resolved.lr > 0  # smallm-rm without --lr crashed here once


def test_groups_follow_the_module_types_and_hold_every_parameter_once() -> None:
    model = tiny(tied=False, qkv_bias=True)
    groups = {role: {id(p) for p in ps} for role, ps in parameter_groups(model).items()}
    named = dict(model.named_parameters())
    role_of = {name: next(r for r, ids in groups.items() if id(p) in ids) for name, p in named.items()}
    assert role_of["model.layers.0.self_attn.q_proj.weight"] == "matrix"
    assert role_of["model.layers.0.self_attn.q_proj.bias"] == "vector"  # a bias is no matrix, whatever its name
    assert role_of["model.embed_tokens.weight"] == "embedding" and role_of["lm_head.weight"] == "head"
    assert role_of["model.norm.weight"] == "vector" and role_of["model.layers.1.mlp.down_proj.weight"] == "matrix"

    class Gate(nn.Module):  # a parameter of a module type no group describes is refused by name
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

    model.model.layers[0].gate = Gate()
    with pytest.raises(TypeError, match=r"model.layers.0.gate.scale \(a parameter of a Gate\) belongs to no"):
        parameter_groups(model)


def test_muon_momentum_warms_up_and_resumes_where_it_was() -> None:
    model = tiny()
    cfg = TrainConfig(optimizer="muon", muon_momentum=0.95)
    optimizer = optimizer_of(model, cfg, total_steps=30)
    assert optimizer.momentum_at(0) == pytest.approx(0.85) and optimizer.momentum_at(10) == pytest.approx(0.95)
    x = torch.randint(0, 128, (2, 16))
    for _ in range(4):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.muon.param_groups[0]["momentum"] == pytest.approx(optimizer.momentum_at(3))
    state = optimizer.state_dict()
    again = optimizer_of(tiny(), cfg, total_steps=30)
    again.load_state_dict(state)
    assert again.steps == 4 and torch.equal(
        next(iter(again.muon.state.values()))["momentum_buffer"],
        next(iter(optimizer.muon.state.values()))["momentum_buffer"],
    )
    with pytest.raises(ValueError, match="another --optimizer"):
        again.load_state_dict(torch.optim.AdamW(tiny().parameters()).state_dict())


def test_a_schedule_moves_every_group_of_the_combined_optimizer() -> None:
    model = tiny(tied=False)
    cfg = TrainConfig(optimizer="muon", warmup_steps=0, decay_fraction=0.5, min_lr_ratio=0.0)
    optimizer = optimizer_of(model, cfg)
    peaks = [g["lr"] for g in optimizer.param_groups]
    schedule = build_schedule(optimizer, cfg, total_steps=10)
    for _ in range(7):
        optimizer.step()
        schedule.step()
    ratios = [g["lr"] / peak for g, peak in zip(optimizer.param_groups, peaks)]
    expected = warmup_stable_decay(7, warmup=0, total=10, decay_fraction=0.5, min_ratio=0.0)
    assert ratios == pytest.approx([expected] * 4)
    assert len(optimizer.muon.param_groups) == 1 and len(optimizer.adamw.param_groups) == 3


def test_muon_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="--fsdp shards across ranks"):
        optimizer_of(tiny(), TrainConfig(optimizer="muon", fsdp=True))
    assert isinstance(optimizer_of(tiny(), TrainConfig(fsdp=True)), torch.optim.AdamW)  # auto
    peft = pytest.importorskip("peft")
    from smallm.model.lora import LoraSettings, apply_lora

    model = tiny()
    apply_lora(model, LoraSettings(r=4))
    assert peft is not None
    with pytest.raises(ValueError, match="LoRA adapters are trained with AdamW"):
        optimizer_of(model, FinetuneConfig(optimizer="muon", lora_r=4))
    assert isinstance(optimizer_of(model, FinetuneConfig(lora_r=4)), torch.optim.AdamW)
