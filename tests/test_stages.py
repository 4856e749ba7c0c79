"""Training stages ([[stage]], TinyLlama v1.1's recipe): one run, one step counter, each stage with its steps,
mixture, batch size and part of the schedule; resume mid-stage and across a boundary is bitwise; a stage
may be appended to a finished run, which goes on with its optimizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from smallm.run.checkpoint import latest_checkpoint, load_weights
from smallm.train.config import TrainConfig, build_config
from smallm.train.jobs import build_trainer
from test_trainer import config, interrupt_after

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def stages(sources: dict[str, Path]) -> list[dict[str, Any]]:
    return [
        {"name": "basic", "steps": 4, "data": str(sources["en"])},
        {"name": "continual", "steps": 4, "data": [f"{sources['ko']}:0.7", f"{sources['code']}:0.3"]},
        {"name": "cooldown", "tokens": 1024, "batch_tokens": 512, "lr": "decay",
         "data": [f"{sources['en']}:1", f"{sources['ko']}:1", f"{sources['code']}:1"]},
    ]  # fmt: skip


def staged_config(sources: dict[str, Path], out: Path, **overrides: Any) -> TrainConfig:
    values = {**vars(config(sources["en"], out, checkpoint_every=2, eval_every=100, warmup_steps=1)),
              "stage": stages(sources), **overrides}  # fmt: skip
    return build_config(TrainConfig, values)


def lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stages_run_in_order_with_their_batch_sizes_data_and_schedule(sources: dict[str, Path], tmp_path: Path) -> None:
    trainer = build_trainer(staged_config(sources, tmp_path))
    cfg = trainer.cfg  # the resolved settings: the length from the stages
    assert cfg.max_steps == 10 and cfg.stage[2]["steps"] == 2  # 1024 tokens of 512 a step
    assert cfg.decay_fraction == 0.2  # the decay spans the cooldown stage
    trainer.fit()
    assert trainer.state.tokens_seen == 4 * 128 + 4 * 128 + 2 * 512  # 4 micro-batches a step in the cooldown
    train = [r for r in lines(tmp_path) if "loss" in r]
    assert [r["stage"] for r in train] == [0] * 4 + [1] * 4 + [2] * 2
    lrs = [r["lr"] for r in train]  # a line gives the rate of the next step
    assert lrs[0] == lrs[6] == max(lrs) > lrs[7] > lrs[8]  # stable through stage 1, decaying in the cooldown
    val = [r for r in lines(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in val] == [4, 8, 10]  # the end of every stage
    assert all(len([k for k in r if k.startswith("val/") and k.endswith("_bpb")]) == 3 for r in val)
    epochs = [r for r in train if r["stage"] == 1]
    assert all(k.startswith("epoch/") for r in epochs for k in r if "/" in k and not k.startswith("val/"))


def test_resume_mid_stage_and_across_a_boundary_is_bitwise(sources: dict[str, Path], tmp_path: Path) -> None:
    build_trainer(staged_config(sources, tmp_path / "straight")).fit()
    # The checkpoint at step 6 is mid stage 1; the rest crosses into the cooldown.
    interrupt_after(7, staged_config(sources, tmp_path / "resumed"))
    assert latest_checkpoint(tmp_path / "resumed").name == "step_00000006"
    build_trainer(staged_config(sources, tmp_path / "resumed", resume=True)).fit()
    a = load_weights(latest_checkpoint(tmp_path / "straight"))
    b = load_weights(latest_checkpoint(tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in lines(tmp_path / "resumed") if "loss" in r]
    assert steps == list(range(1, 11))


def test_a_stage_appended_to_a_finished_run_continues_it(sources: dict[str, Path], tmp_path: Path) -> None:
    first = stages(sources)[:2]
    build_trainer(staged_config(sources, tmp_path, stage=first)).fit()
    trainer = build_trainer(staged_config(sources, tmp_path, resume=True))
    assert trainer.state.step == 8 and trainer.max_steps == 10
    trainer.fit()
    assert [r["stage"] for r in lines(tmp_path) if "loss" in r][-2:] == [2, 2]
    changed = [{**first[0], "steps": 5}, first[1]]
    with pytest.raises(ValueError, match="cannot change stage"):
        build_trainer(staged_config(sources, tmp_path, stage=changed, resume=True))


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"steps": 2, "tokens": 100}, r"give its length as steps or as tokens \(one of them\)"),
        ({}, "give its length as steps or as tokens"),
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"steps": 2, "lr": "cosine"}, "lr must be stable or decay"),
        ({"steps": 2, "epochs": 1}, r"unknown key\(s\) \['epochs'\]"),
        ({"steps": 2, "data": ["a:-2"]}, "the weight must be a positive finite number"),
    ],
)  # fmt: skip
def test_bad_stages_are_clear_errors(stage: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(TrainConfig, {"data": "d", "out": str(tmp_path), "stage": [stage]})


def test_decay_stages_come_last_and_batch_sizes_must_divide(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the stages with lr = decay must come last"):
        build_config(TrainConfig, {"data": "d", "stage": [{"steps": 1, "lr": "decay"}, {"steps": 1}]})
    odd = [{"steps": 2, "batch_tokens": 200}]
    with pytest.raises(ValueError, match="stage stage0: batch_tokens 200 is not a multiple of --batch-size 4"):
        build_trainer(staged_config(sources, tmp_path, stage=odd))


def test_stages_can_start_from_another_runs_weights(sources: dict[str, Path], tmp_path: Path) -> None:
    build_trainer(staged_config(sources, tmp_path / "first", stage=stages(sources)[:1])).fit()
    cfg = staged_config(sources, tmp_path / "continued", stage=stages(sources)[1:], init_from=str(tmp_path / "first"))
    trainer = build_trainer(cfg)
    start = load_weights(latest_checkpoint(tmp_path / "first"))
    assert all(torch.equal(p.detach(), start[k]) for k, p in trainer.model.module.state_dict().items() if k in start)
    trainer.fit()
    assert [r["stage"] for r in lines(tmp_path / "continued") if "loss" in r] == [0] * 4 + [1] * 2
