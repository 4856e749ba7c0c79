"""Optimizers and schedules: Muon takes the block matrices and AdamW the rest, the rates scale with width
and batch, the schedules have their shapes, and the combined optimizer saves and restores exactly."""

from __future__ import annotations

import pytest
import torch
from smallm.config import FinetuneConfig, TrainConfig
from smallm.model import ModelConfig, SmallLM
from smallm.optim import (
    MuonWithAdamW,
    build_optimizer,
    build_schedule,
    cosine_with_warmup,
    learning_rates,
    warmup_stable_decay,
)

CPU = torch.device("cpu")


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
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), CPU)
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
    rates = learning_rates(TrainConfig(optimizer="muon"), "muon", 64)
    head = optimizer.adamw.param_groups[0 if tied else 1]["lr"]
    assert head == pytest.approx(rates.head)  # a tied embedding is the output layer too: the head's rate


def test_rates_scale_with_width_and_given_rates_win() -> None:
    cfg = TrainConfig(optimizer="muon")
    base = learning_rates(cfg, "muon", 768)
    wide = learning_rates(cfg, "muon", 4 * 768)
    assert wide.matrix == base.matrix and wide.embedding == pytest.approx(base.embedding / 2)
    assert wide.head == pytest.approx(base.head / 2) and wide.norm == pytest.approx(base.norm / 2)
    given = learning_rates(TrainConfig(optimizer="muon", lr=0.5, head_lr=0.25), "muon", 768)
    assert (given.matrix, given.head, given.embedding) == (0.5, 0.25, base.embedding)
    assert learning_rates(TrainConfig(optimizer="adamw"), "adamw", 768).matrix == pytest.approx(6e-4)
    assert learning_rates(TrainConfig(optimizer="adamw"), "adamw", 256).matrix == pytest.approx(1.8e-3)
    assert learning_rates(FinetuneConfig(lora_r=8), "adamw", 768).matrix == pytest.approx(2e-4)


def test_muon_momentum_warms_up_and_resumes_where_it_was() -> None:
    model = tiny()
    cfg = TrainConfig(optimizer="muon", muon_momentum=0.95)
    optimizer = build_optimizer(model, cfg, CPU, total_steps=30)
    assert optimizer.momentum_at(0) == pytest.approx(0.85) and optimizer.momentum_at(10) == pytest.approx(0.95)
    x = torch.randint(0, 128, (2, 16))
    for _ in range(4):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.muon.param_groups[0]["momentum"] == pytest.approx(optimizer.momentum_at(3))
    state = optimizer.state_dict()
    again = build_optimizer(tiny(), cfg, CPU, total_steps=30)
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
    optimizer = build_optimizer(model, cfg, CPU)
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
        build_optimizer(tiny(), TrainConfig(optimizer="muon", fsdp=True), CPU)
    assert isinstance(build_optimizer(tiny(), TrainConfig(fsdp=True), CPU), torch.optim.AdamW)  # auto
    peft = pytest.importorskip("peft")
    from smallm.lora import LoraSettings, apply_lora

    model = tiny()
    apply_lora(model, LoraSettings(r=4))
    assert peft is not None
    with pytest.raises(ValueError, match="LoRA adapters are trained with AdamW"):
        build_optimizer(model, FinetuneConfig(optimizer="muon", lora_r=4), CPU)
    assert isinstance(build_optimizer(model, FinetuneConfig(lora_r=4), CPU), torch.optim.AdamW)
