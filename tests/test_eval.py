"""Evaluation: loss against a direct cross entropy, bits per byte, every token a target once, on shards and
raw text, the smallm-eval command and its errors, and agreement with the trainer's validation."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from smallm import Tokenizer
from smallm.cli import eval as eval_cli
from smallm.data.loader import ValidationLoader
from smallm.data.shardset import ShardSet
from smallm.inference.evaluate import byte_length_table, evaluate_batches, text_tokens
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.config import TrainConfig

MODEL = ModelConfig(vocab_size=448, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, max_seq_len=64)
LINES = [f"the quick brown fox {i} jumps over the lazy dog; 빠른 갈색 여우가 {i}번 뛰어요 🦊" for i in range(120)] + [
    f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(40)
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shard_dir(make_shards) -> Path:
    return make_shards(LINES, 400, shard_tokens=300, val_fraction=0.2)


@pytest.fixture(scope="module")
def tok(shard_dir: Path) -> Tokenizer:
    return Tokenizer.load(shard_dir)


@pytest.fixture(scope="module")
def run_dir(tok: Tokenizer, save_run) -> Path:
    """An untrained model (weights at init with a larger std, so the loss is far from uniform) and the
    tokenizer of the shards."""
    torch.manual_seed(0)
    return save_run(SmallLM(ModelConfig(**{**asdict(MODEL), "init_std": 0.2})), tok)


@pytest.fixture(scope="module")
def model(run_dir: Path) -> SmallLM:
    from smallm.run.load import load_model

    return load_model(run_dir)[0]


def direct_loss_sum(model: SmallLM, tokens: np.ndarray, seq_len: int) -> tuple[float, int]:
    """Summed cross entropy and target count of rows of T+1 tokens with stride T, one unpadded row at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, seq_len):
            window = torch.as_tensor(tokens[start : start + seq_len + 1].astype(np.int64))
            logits = model(window[None, :-1])[0]
            total += F.cross_entropy(logits.double(), window[1:], reduction="sum").item()
            count += len(window) - 1
    return total, count


def utf8_bytes(tok: Tokenizer, ids: np.ndarray) -> int:
    specials = set(tok.special_tokens.values())
    return sum(0 if i in specials else len(tok.token_bytes(i)) for i in ids.tolist())


def test_loss_on_shards_equals_a_direct_cross_entropy(model: SmallLM, shard_dir: Path, tok: Tokenizer) -> None:
    val = ShardSet.open(shard_dir, "val")
    assert len(val.shards) > 1  # rows restart at every shard
    result = evaluate_batches(model, ValidationLoader(val, 3, 16), byte_length_table(tok, MODEL.vocab_size))
    loss_sum, count, nbytes = 0.0, 0, 0
    for shard in val.shards:
        shard_loss, shard_count = direct_loss_sum(model, shard.array, 16)
        loss_sum, count = loss_sum + shard_loss, count + shard_count
        nbytes += utf8_bytes(tok, shard.array[1:])
    assert result["tokens"] == count == val.num_tokens - len(val.shards)  # every token but each shard's first
    assert result["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss_sum / count), rel=1e-5)
    assert result["bytes"] == nbytes
    assert result["bits_per_byte"] == pytest.approx(loss_sum / math.log(2) / nbytes, rel=1e-5)


@pytest.mark.parametrize("length", [2, 10, 11, 12, 103])
def test_token_arrays_make_every_token_but_the_first_a_target_exactly_once(length: int) -> None:
    tokens = np.random.default_rng(length).integers(0, 300, length)
    windows = ValidationLoader(tokens, batch_size=4, seq_len=10, pad_id=299)
    batches = list(windows)
    assert len(batches) == len(windows)
    targets = np.concatenate([y[y != -100].numpy() for _, y in batches])
    assert targets.tolist() == tokens[1:].tolist()
    for x, y in batches:  # each target follows its input
        for row_x, row_y in zip(x, y):
            keep = row_y != -100
            assert row_x[keep][1:].tolist() == row_y[keep][:-1].tolist()


def test_raw_text_files_as_documents_with_json_output(
    run_dir: Path, model: SmallLM, tok: Tokenizer, tmp_path: Path, capsys
) -> None:
    texts = [
        "the quick brown fox 7 jumps over the lazy dog. " * 6,
        "빠른 갈색 여우가 뛰어요 🦊\ndef f(x):\n    return x\n",
    ]
    files = [tmp_path / "a.txt", tmp_path / "b.md"]
    for file, text in zip(files, texts):
        file.write_text(text, encoding="utf-8")
    stream = text_tokens(tok, files)
    expected_stream = [tok.eot_token, *tok.encode_ordinary(texts[0]), tok.eot_token, *tok.encode_ordinary(texts[1])]
    assert stream.tolist() == expected_stream
    argv = [str(run_dir), "--data", str(tmp_path), "--json", "--seq-len", "16", "--batch-size", "4"]
    assert eval_cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    loss_sum, count = direct_loss_sum(model, stream, 16)
    assert report["tokens"] == count == len(stream) - 1
    assert report["bytes"] == sum(len(t.encode("utf-8")) for t in texts)  # every text byte is a target's
    assert report["loss"] == pytest.approx(loss_sum / count, rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(loss_sum / math.log(2) / report["bytes"], rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
    assert report["batches"] == math.ceil(math.ceil((len(stream) - 1) / 16) / 4) and report["seq_len"] == 16


def test_shard_directory_splits_and_max_batches(run_dir: Path, shard_dir: Path, capsys) -> None:
    assert eval_cli.main([str(run_dir), "--data", str(shard_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(val:" in out and "bits per byte" in out and "nats/token" in out
    argv = [str(run_dir), "--data", str(shard_dir), "--split", "train", "--max-batches", "2", "--json"]
    assert eval_cli.main([*argv, "--batch-size", "3", "--seq-len", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 2 and report["tokens"] == 2 * 3 * 32 and "(train:" in report["data"]


def test_eval_command_errors_exit_1_with_the_reason(run_dir: Path, shard_dir: Path, tmp_path: Path, capsys) -> None:
    assert eval_cli.main([str(tmp_path / "nowhere"), "--data", str(shard_dir)]) == 1
    assert "smallm-eval: error:" in capsys.readouterr().err
    assert eval_cli.main([str(run_dir), "--data", str(shard_dir), "--seq-len", "65"]) == 1
    assert "--seq-len must be in 1..64" in capsys.readouterr().err
    other_run = tmp_path / "other_run"
    shutil.copytree(run_dir, other_run)
    Tokenizer.train_from_iterator(LINES[:50], 300).save(other_run)
    assert eval_cli.main([str(other_run), "--data", str(shard_dir)]) == 1
    assert "made with another tokenizer" in capsys.readouterr().err


def test_evaluate_batches_agrees_with_the_trainers_validation(shard_dir: Path, tmp_path: Path) -> None:
    from smallm.train.jobs import build_trainer

    model = dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, max_seq_len=32)
    cfg = TrainConfig(data=str(shard_dir), out=str(tmp_path), model=model, batch_size=4, seq_len=32, device="cpu")
    trainer = build_trainer(cfg)
    metrics = trainer.evaluate()
    loader = ValidationLoader(ShardSet.open(shard_dir, "val"), 4, 32)
    byte_lengths = byte_length_table(trainer.task.tokenizer, trainer.model.config.vocab_size)
    ours = evaluate_batches(trainer.model.module, loader, byte_lengths)
    assert ours["loss"] == pytest.approx(metrics["val_loss"], rel=1e-6)
    assert ours["perplexity"] == pytest.approx(metrics["val_ppl"], rel=1e-6)
    assert ours["bits_per_byte"] == pytest.approx(metrics["val_bpb"], rel=1e-6)
