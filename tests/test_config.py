"""Run configuration: one base for every kind of run, one check all of them go through, and only the
flags a kind of run uses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from smallm.cli import finetune as finetune_cli
from smallm.cli import train as train_cli
from smallm.train.config import DPOConfig, FinetuneConfig, RunConfig, TrainConfig, build_config, validate


def flags(parser_help: str) -> set[str]:
    return {word.rstrip(",") for word in parser_help.split() if word.startswith("--")}


def test_the_shared_fields_are_declared_once() -> None:
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    for kind in (TrainConfig, FinetuneConfig, DPOConfig):
        fields = {f.name: f for f in dataclasses.fields(kind)}
        assert shared <= fields.keys()
        for name in shared:  # a kind may change a default, never the help or the constraints
            assert fields[name].metadata == next(f for f in dataclasses.fields(RunConfig) if f.name == name).metadata


@pytest.mark.parametrize("kind", [TrainConfig, FinetuneConfig, DPOConfig])
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"precision": "bf61"}, "precision must be one of auto, bf16, fp16, fp32, got 'bf61'"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"beta2": 1.0}, "beta2 must be below 1, got 1.0"),
        ({"max_steps": "5"}, "max_steps must be int, got '5'"),
        ({"lr": -1.0}, "lr must be positive"),
        ({"optimizer": "sgd"}, "optimizer must be one of auto, muon, adamw, paged-adamw"),
    ],
)
def test_every_kind_of_run_checks_the_shared_fields(kind: type, setting: dict, message: str) -> None:
    base = {"init_from": "ckpt", "data": "chats.jsonl"} if kind is not TrainConfig else {}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(kind(**base, **setting))


def test_fine_tuning_rules(tmp_path: Path) -> None:
    def check(kind: type = FinetuneConfig, **values: object) -> None:
        validate(kind(**{"init_from": "ckpt", "data": "chats.jsonl", **values}))

    check()
    with pytest.raises(ValueError, match="give --lora-r too"):
        check(quantize="nf4")
    with pytest.raises(ValueError, match="positive --epochs"):
        check(epochs=0.0)
    with pytest.raises(ValueError, match="LoRA runs replicate"):
        check(lora_r=4, fsdp=True)
    with pytest.raises(ValueError, match="beta must be positive"):
        check(DPOConfig, beta=0.0)
    with pytest.raises(ValueError, match="does not shard with --fsdp"):
        check(DPOConfig, fsdp=True)
    with pytest.raises(ValueError, match="fine-tuning starts from a checkpoint"):
        validate(FinetuneConfig(data="chats.jsonl"))


def test_each_command_offers_only_the_flags_its_run_uses(capsys: pytest.CaptureFixture[str]) -> None:
    helps = {}
    for name, parser in (
        ("train", train_cli.build_parser()),
        ("sft", finetune_cli.build_parser("sft")),
        ("dpo", finetune_cli.build_parser("dpo")),
    ):
        helps[name] = flags(parser.format_help())
    assert {"--preset", "--sampling", "--dry-run", "--model-n-layer"} <= helps["train"]
    assert not {"--lora-r", "--beta", "--epochs", "--val-data", "--grad-accum"} & helps["train"]
    assert {"--lora-r", "--quantize", "--epochs", "--val-data", "--grad-accum"} <= helps["sft"]
    assert not {"--beta", "--preset", "--sampling", "--batch-tokens", "--init"} & helps["sft"]
    assert {"--dry-run", "--dry-run-steps", "--fit-memory"} <= helps["sft"] & helps["train"]
    assert helps["dpo"] == helps["sft"] | {"--beta"}
    shared = {"--lr", "--precision", "--schedule", "--optimizer", "--resume", "--keep-last"}
    assert all(shared <= h for h in helps.values())


def test_a_bad_precision_for_sft_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sft.toml"
    config.write_text('precision = "bf61"\n', encoding="utf-8")
    argv = [str(tmp_path / "base"), "--data", str(tmp_path / "chats.jsonl"), "--config", str(config)]
    assert finetune_cli.sft_main(argv) == 1
    err = capsys.readouterr().err
    assert "smallm-sft: error:" in err and "precision must be one of auto, bf16, fp16, fp32, got 'bf61'" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):  # on the command line argparse refuses it, naming the choices
        finetune_cli.sft_main([*argv[:3], "--precision", "bf61"])
    assert "invalid choice: 'bf61'" in capsys.readouterr().err


def test_a_config_file_names_what_it_gets_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text('max_steps = "many"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"run.toml: max_steps must be int, got 'many'"):
        train_cli.parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['beta'\]"):
        build_config(FinetuneConfig, {"init_from": "ckpt", "data": "x.jsonl", "beta": 0.1}, "sft.toml")
    assert build_config(DPOConfig, {"init_from": "ckpt", "data": "x.jsonl", "beta": 0.2}).beta == 0.2


def test_pretraining_batches_are_given_in_tokens() -> None:
    cfg = TrainConfig(batch_size=4, batch_tokens=4 * 256 * 6)
    assert cfg.micro_batches(256, 1) == 6 and cfg.micro_batches(256, 2) == 3
    with pytest.raises(ValueError, match=r"--batch-tokens 6144 is not a multiple of --batch-size 4 x seq_len 256 x 4"):
        cfg.micro_batches(256, 4)
    assert TrainConfig(preset="124m").step_tokens() == 2**19  # the preset's
    assert FinetuneConfig(grad_accum=3).micro_batches(1024, 8) == 3


def test_validate_only_checks_and_resolving_fills_in_what_follows(make_shards, corpus_docs: list[str]) -> None:
    import torch
    from smallm.train.resolve import is_resolved, resolve

    data = make_shards(corpus_docs[:30])
    stages = [{"steps": 3, "data": str(data)}, {"tokens": 4096, "data": str(data), "lr": "decay"}]
    cfg = TrainConfig(data=str(data), stage=stages, batch_size=2, seq_len=32, batch_tokens=128)
    before = dataclasses.replace(cfg)
    validate(cfg)
    assert cfg == before  # nothing filled in
    resolved = resolve(cfg, torch.device("cpu"))
    assert is_resolved(resolved) and resolve(resolved, torch.device("cpu")) == resolved  # once is enough
    assert (resolved.max_steps, resolved.decay_fraction) == (3 + 32, 32 / 35)
    assert (resolved.optimizer, resolved.device, resolved.precision, resolved.beta1) == ("muon", "cpu", "fp32", 0.8)
    assert None not in (resolved.lr, resolved.embedding_lr, resolved.head_lr, resolved.norm_lr)


def test_config_json_of_a_default_run_names_the_rates_and_the_batch_it_used(
    make_shards, corpus_docs: list[str], tmp_path: Path
) -> None:
    import json

    from smallm.train.jobs import build_trainer

    cfg = build_config(TrainConfig, {"data": str(make_shards(corpus_docs[:30])), "out": str(tmp_path / "run"),
                                     "max_steps": 1, "device": "cpu", "seq_len": 32, "batch_size": 2})  # fmt: skip
    trainer = build_trainer(cfg)
    trainer.fit()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    train, batch = saved["train"], saved["batch"]
    peaks = [group["initial_lr"] for group in trainer.optimizer.param_groups]  # matrices, embedding, head, norms
    assert [train["lr"], train["embedding_lr"], train["head_lr"], train["norm_lr"]] == peaks
    assert (train["optimizer"], train["seq_len"], train["batch_tokens"]) == ("muon", 32, 2048)  # the tiny preset's
    assert batch == {"rows": 2, "seq_len": 32, "micro_batches": 32, "ranks": 1, "tokens_per_step": 2048, "steps": 1}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("stage = 5", r"stage must be a list of \[\[stage\]\] tables \(each with steps or tokens\), got 5"),
        ("model = 5", r"run.toml: model must be a table of the model's settings \(\[model\] with .*, got 5"),
        ('model = "abc"', r"run.toml: model must be a table of the model's settings .*got 'abc'"),
    ],
)
def test_a_scalar_where_a_table_belongs_is_one_line_naming_it(
    line: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f"max_steps = 3\n{line}\n")
    with pytest.raises(ValueError, match=message):
        train_cli.parse_config(["--config", str(config)])
    assert train_cli.main(["--config", str(config), "--out", str(tmp_path / "run")]) == 1
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()
