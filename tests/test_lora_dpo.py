"""smallm-sft / smallm-dpo / smallm-merge: full, LoRA and QLoRA fine-tuning, DPO, adapters and peft."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from smallm import Tokenizer
from smallm.cli.finetune import sft_main
from smallm.cli.merge import main as merge_main
from smallm.data.conversations import pair_tensors
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.model.lora import AdapterError
from smallm.run.checkpoint import CheckpointError, latest_checkpoint, load_weights
from smallm.run.load import load_model
from smallm.run.write import merge_run, write_run
from smallm.train.config import DPOConfig, FinetuneConfig, validate
from smallm.train.jobs import build_trainer
from smallm.train.trainer import Trainer

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:.*is an Enum subclass:DeprecationWarning"),
    # peft (0.21) still asks transformers (5.x) for a renamed attribute when it wraps a transformers model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def make_base(directory: Path, tok: Tokenizer, n_layer: int = 2, seed: int = 0, tied: bool = True) -> Path:
    config = ModelConfig(
        vocab_size=1216, n_layer=n_layer, n_embd=128, n_head=4, n_kv_head=2, max_seq_len=128, tie_embeddings=tied
    )
    torch.manual_seed(seed)
    model = SmallLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return write_run(directory, model, tok, {"train": {}, "model": dataclasses.asdict(config)}, force=True)


@pytest.fixture(scope="module")
def base(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("base"), tok)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("data")
    chats, pairs = folder / "chats.jsonl", folder / "pairs.jsonl"
    with open(chats, "w") as c, open(pairs, "w") as p:
        for i in range(40):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            messages = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            if i % 4 == 0:
                messages.insert(0, {"role": "system", "content": "You add numbers."})
            c.write(json.dumps({"messages": messages}) + "\n")
            wrong = f"I believe it is {a + b + rng.randint(1, 5)}, or so."
            p.write(json.dumps({"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}.", "rejected": wrong}) + "\n")
    return chats, pairs


def config(base: Path, data: Path, out: Path, method: str = "sft", **overrides: Any) -> FinetuneConfig:
    values: dict[str, Any] = dict(
        init_from=str(base), data=str(data), out=str(out), max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2,
        log_every=1, eval_every=6, checkpoint_every=4, sample_tokens=8, device="cpu", val_fraction=0.1,
    )  # fmt: skip
    values.update(overrides)
    return (DPOConfig if method == "dpo" else FinetuneConfig)(**values)


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.tensor([[5, 17, 300, 42, 9, 811, 64, 3]])


# ----- SFT ------------------------------------------------------------------------------------------


def test_full_sft_learns_the_replies(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    result = build_trainer(config(base, data[0], tmp_path, max_steps=20)).fit()
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]
    assert "val_loss" in result and isinstance(result["sample"], str)
    run_config = json.loads((tmp_path / "config.json").read_text())
    assert run_config["finetune"]["method"] == "sft" and "lora" not in run_config
    model, _, _ = load_model(tmp_path)  # a full fine-tune is a plain checkpoint
    assert not torch.equal(logits(model, IDS), logits(load_model(base)[0], IDS))


def test_epochs_set_the_step_count_and_long_conversations_are_dropped(
    base: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.warns(UserWarning, match=r"\d+ of 36 training conversations are longer than the context of 50"):
        trainer = build_trainer(config(base, data[0], tmp_path, max_steps=0, epochs=2, seq_len=50))
    rows = trainer.loader.rows
    assert 0 < rows.dropped < 36
    assert trainer.max_steps == math.ceil(2 * len(rows) / 4)


def test_lora_run_checkpoints_its_adapter_and_resumes_exactly(
    base: Path, data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(lora_r=4, lora_targets="q_proj,v_proj,down_proj", lora_dropout=0.1)
    whole = tmp_path / "whole"
    build_trainer(config(base, data[0], whole, **settings)).fit()
    saved = load_weights(latest_checkpoint(whole))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert len(saved) == 2 * 2 * 3  # A and B, 2 layers, 3 targets

    interrupted = tmp_path / "interrupted"
    real_step, calls = Trainer.train_step, {"n": 0}

    def step_then_crash(self: Trainer) -> dict[str, float]:
        if calls["n"] == 6:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(config(base, data[0], interrupted, **settings)).fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    build_trainer(config(base, data[0], interrupted, resume=True, **settings)).fit()
    resumed = load_weights(latest_checkpoint(interrupted))
    for key in saved:
        assert torch.equal(saved[key], resumed[key]), key


@pytest.fixture(scope="module")
def lora_run(base: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora")
    build_trainer(config(base, data[0], out, lora_r=8, lora_alpha=16, max_steps=10)).fit()
    return out


def test_the_adapter_loads_in_peft_onto_the_exported_model(
    lora_run: Path, base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peft applies the adapter (RUN/adapter, and ``smallm-export RUN --adapter``) onto transformers'
    LlamaForCausalLM from smallm-export of the base, and gives what smallm computes with the adapter merged
    (load_model of the run)."""
    transformers = pytest.importorskip("transformers")
    from smallm.interop.hf_export import export_hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exported = export_hf(base, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    from smallm.cli.export import main as export

    assert export([str(lora_run), "--adapter", "--out", str(tmp_path / "adapter")]) == 0  # the same, on request
    exported_adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert exported_adapter == json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours, _, config = load_model(lora_run)
    assert config["lora"]["r"] == 8
    expected = logits(ours, IDS)
    with torch.no_grad():
        got = with_adapter(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    base_logits = logits(load_model(base)[0], IDS)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changed something


def test_merge_folds_the_adapter_into_the_base(lora_run: Path, base: Path, tmp_path: Path) -> None:
    assert merge_main([str(lora_run), "--out", str(tmp_path / "merged")]) == 0
    merged, _, config = load_model(tmp_path / "merged")
    assert "lora" not in config and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged, IDS), logits(load_model(lora_run)[0], IDS))
    # From the peft folder, naming the base.
    again = merge_run(lora_run / "adapter", tmp_path / "from-folder", base=base)
    torch.testing.assert_close(logits(load_model(again)[0], IDS), logits(merged, IDS))
    assert merge_main([str(lora_run), "--out", str(tmp_path / "merged")]) == 1  # exists: needs --force


def test_an_adapter_for_another_base_is_refused(
    lora_run: Path, tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_base(tmp_path / "deeper", tok, n_layer=3)
    expected = re.escape(
        "does not match this base model: 14 adapter tensor(s) missing, e.g. base_model.model.model.layers.2"
    )
    with pytest.raises(AdapterError, match=expected):
        merge_run(lora_run, tmp_path / "out", base=other)
    # A peft folder whose base is not a local path needs --base.
    folder = tmp_path / "adapter"
    shutil.copytree(lora_run / "adapter", folder)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "someone/some-model"
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert merge_main([str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "name the smallm checkpoint the adapter was trained on with --base" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qlora_trains_adapters_over_a_frozen_nf4_base(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("torchao")
    with pytest.warns(UserWarning, match="not a multiple of 16384"):  # k_proj/v_proj of this tiny model
        trainer = build_trainer(config(base, data[0], tmp_path, lora_r=8, quantize="nf4", max_steps=10))
    q_proj = trainer.model.module.model.layers[0].self_attn.q_proj.base_layer.weight
    assert type(q_proj).__name__ == "NF4Tensor"
    n = q_proj.numel()
    # NF4 with double quantization: 4 bits per weight, one int8 scale per block of 64, one fp32 factor
    # per 256 scales.
    assert q_proj.quantized_data.numel() == n // 2 and q_proj.quantized_scalers.numel() == n // 64
    assert q_proj.quantization_factor.numel() == n // (64 * 256)
    before = q_proj.quantized_data.clone()
    trainer.fit()
    assert torch.equal(q_proj.quantized_data, before)  # the base stayed frozen
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert lines[-1]["loss"] < lines[0]["loss"]
    merged, _, _ = load_model(tmp_path)  # merged onto the full-precision base it names
    assert type(merged.model.layers[0].self_attn.q_proj.weight) is torch.nn.Parameter


def test_nf4_matmul_is_the_dequantized_weight(one_torch_thread: None) -> None:
    pytest.importorskip("torchao")
    from smallm.model.lora import quantize_nf4

    torch.manual_seed(0)
    layer = torch.nn.Sequential()
    layer.add_module("q_proj", torch.nn.Linear(256, 128, bias=False))
    original = layer.q_proj.weight.detach().clone()
    assert quantize_nf4(layer, torch.device("cpu"), torch.float32) == 256 * 128 // 2 + 256 * 128 // 64 + 2 * 4
    weight = layer.q_proj.weight
    dequantized = weight.get_original_weight()
    assert (dequantized - original).abs().mean() < 0.1 * original.abs().mean()
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer.q_proj(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)


# ----- DPO ------------------------------------------------------------------------------------------


def sequence_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An independent implementation: log-softmax, gather, masked sum."""
    with torch.no_grad():
        logp = F.log_softmax(model(x).float(), dim=-1)
    mask = y != -100
    picked = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (picked * mask).sum(-1)


def test_dpo_loss_is_the_formula_and_starts_at_log_2(base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    trainer = build_trainer(config(base, data[1], tmp_path, method="dpo", beta=0.5))
    dpo, model = trainer.objective, trainer.model.module
    x, y = pair_tensors(trainer.loader.pairs[:4], trainer.task.data.pad_id(), torch.device("cpu"))
    loss, stats = dpo.pair_stats(model, (x, y))
    torch.testing.assert_close(loss, torch.tensor(4 * math.log(2)))  # policy == reference
    assert stats[3] == 0  # no margin is positive yet
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loss, stats = dpo.pair_stats(model, (x, y))
    with dpo.reference() as frozen:
        policy, reference = sequence_logps(model, x, y), sequence_logps(frozen, x, y)
    reward = 0.5 * (policy - reference)
    expected = -F.logsigmoid(reward[:4] - reward[4:]).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats[1].float(), reward[:4].sum(), rtol=1e-4, atol=1e-4)
    assert stats[3] == (reward[:4] > reward[4:]).sum()


def test_dpo_with_lora_learns_the_preference_against_the_disabled_adapter(
    lora_run: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    trainer = build_trainer(config(lora_run, data[1], tmp_path, method="dpo", lora_r=4, lr=1e-2, max_steps=16))
    start = logits(trainer.model.module, IDS)
    result = trainer.fit()
    assert result["val_reward_accuracy"] >= 0.75 and result["val_reward_margin"] > 0
    assert result["reward_margin"] > 0
    with trainer.model.peft.disable_adapter():  # the reference is the starting model, untouched
        torch.testing.assert_close(logits(trainer.model.module.eval(), IDS), start)
    assert {"reward_chosen", "reward_rejected", "reward_accuracy"} <= set(metrics(tmp_path)[0])


# ----- the command line -----------------------------------------------------------------------------


def test_sft_command_reports_bad_data_with_its_line(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    assert sft_main([str(base), "--data", str(data), "--out", str(tmp_path / "run")]) == 1
    assert "chats.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert sft_main([str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--quantize", "nf4"]) == 1
    assert "give --lora-r too" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_ranks_take_the_same_steps_as_one(method: str, base: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    """QLoRA under DDP (torchrun, gloo): two ranks of batch 2 see the rows one rank of batch 4 sees, and
    the loss is normalized over both ranks' tokens (pairs), so the adapters come out the same."""
    pytest.importorskip("torchao")
    source = data[0] if method == "sft" else data[1]
    common = [
        str(base), "--data", str(source), "--lr", "3e-3", "--max-steps", "3", "--lora-r", "4", "--lora-dropout",
        "0", "--quantize", "nf4", "--device", "cpu", "--val-fraction", "0", "--warmup-steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    module = ["-m", "smallm.cli.finetune", method]
    one = [sys.executable, *module, *common, "--batch-size", "4", "--out", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *module, *common]
    two += ["--batch-size", "2", "--out", str(tmp_path / "two")]
    for command in (one, two):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    a = load_weights(latest_checkpoint(tmp_path / "one"))
    b = load_weights(latest_checkpoint(tmp_path / "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_accumulated_micro_batches_take_the_step_one_batch_takes(
    base: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Packed rows carry different numbers of supervised tokens; the step must weigh every token alike
    whether the rows come as one batch of 4 or two micro-batches of 2."""
    settings = dict(lora_r=4, lora_dropout=0.0, max_steps=3, val_fraction=0.0)
    build_trainer(config(base, data[0], tmp_path / "one", batch_size=4, **settings)).fit()
    build_trainer(config(base, data[0], tmp_path / "two", batch_size=2, grad_accum=2, **settings)).fit()
    a, b = (load_weights(latest_checkpoint(tmp_path / run)) for run in ("one", "two"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_pretraining_can_start_from_a_lora_run(lora_run: Path, tmp_path: Path, tok: Tokenizer, make_shards) -> None:
    from smallm.train.config import TrainConfig

    lines = [f"{i} plus {i} is {2 * i}." for i in range(200)]
    shard_dir = make_shards(lines, tokenizer=tok, val_fraction=0.1)
    cfg = TrainConfig(data=str(shard_dir), out=str(tmp_path / "run"), init_from=str(lora_run), device="cpu")
    trainer = build_trainer(cfg)
    torch.testing.assert_close(logits(trainer.model.module.eval(), IDS), logits(load_model(lora_run)[0], IDS))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from Linux's /proc")
def test_placing_the_frozen_base_keeps_nf4_weights_4_bit(one_torch_thread: None) -> None:
    """Module.to(dtype=...) makes torchao keep a dequantized copy of each NF4 weight (64 MiB for this
    layer); place_frozen_base must not."""
    pytest.importorskip("torchao")
    import gc
    import os as os_

    from smallm.model.lora import place_frozen_base, quantize_nf4

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os_.sysconf("SC_PAGE_SIZE") / 2**20

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(4096, 4096, bias=False))
    model.add_module("norm", torch.nn.LayerNorm(4096))
    quantize_nf4(model, torch.device("cpu"), torch.float32)
    gc.collect()
    before = resident_mib()
    place_frozen_base(model, torch.device("cpu"), torch.bfloat16)
    assert resident_mib() - before < 16
    assert type(model.q_proj.weight).__name__ == "NF4Tensor" and model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [True, False])
def test_lora_can_train_the_embeddings_too(tied: bool, tok: Tokenizer, data: tuple[Path, Path], tmp_path: Path) -> None:
    """--lora-train-embeddings: the embedding table (and an untied lm_head) train in full beside the
    adapters, are checkpointed and resumed with them, and the merged model is the trained one."""
    base = make_base(tmp_path / "base", tok, tied=tied)
    run = tmp_path / "run"
    trainer = build_trainer(config(base, data[0], run, lora_r=4, lora_train_embeddings=True, max_steps=6))
    start = trainer.model.module.model.embed_tokens.weight.detach().clone()
    trainer.fit()
    trained = trainer.model.module.model.embed_tokens.weight.detach()
    assert not torch.equal(start, trained)
    saved = load_weights(latest_checkpoint(run))
    assert ("lm_head.weight" in saved) is not tied and torch.equal(saved["model.embed_tokens.weight"], trained)
    torch.testing.assert_close(logits(load_model(run)[0], IDS), logits(trainer.model.module.eval(), IDS))
    assert not (run / "adapter").exists()  # not a peft adapter alone: merge it
    resumed = build_trainer(config(base, data[0], run, lora_r=4, lora_train_embeddings=True, max_steps=8, resume=True))
    assert torch.equal(resumed.model.module.model.embed_tokens.weight, trained)
    with pytest.raises(ValueError, match="lora-train-embeddings goes with --lora-r in smallm-sft"):
        validate(config(base, data[1], tmp_path / "dpo", method="dpo", lora_r=4, lora_train_embeddings=True))


@pytest.mark.slow
def test_muon_under_ddp_keeps_the_ranks_identical_and_tracks_one_rank(
    base: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Full SFT with Muon on two ranks: every rank orthogonalises the same averaged gradient, so both hold
    the very same weights; and they track one rank of the doubled batch (torch's Muon runs Newton-Schulz
    in bf16, which turns the last-bit differences of a differently summed gradient into differences of a
    few percent of a step, so the runs agree to a fraction of how far they moved, not bitwise)."""
    common = [
        str(base), "--data", str(data[0]), "--optimizer", "muon", "--lr", "0.02", "--max-steps", "3", "--device",
        "cpu", "--val-fraction", "0", "--warmup-steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = str(Path(__file__).with_name("weights_per_rank.py"))
    one = [sys.executable, script, *common, "--batch-size", "4", "--out", str(tmp_path / "one")]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523", script]
    two += [*common, "--batch-size", "2", "--out", str(tmp_path / "two")]
    for command in (one, two):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    single, start = torch.load(tmp_path / "one" / "rank0.pt"), load_weights(latest_checkpoint(base))
    for key, weight in rank0.items():
        assert torch.equal(weight, rank1[key]), key
        moved = (single[key] - start[key]).norm()
        assert (weight - single[key]).norm() < 0.3 * moved, key


def test_a_lora_run_refuses_a_base_that_was_replaced_since(
    tok: Tokenizer, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Issue 12 item 1: a LoRA run whose base directory was overwritten by another run must not merge
    onto those weights without a word; it records the sha256 of its base's weights."""
    base = make_base(tmp_path / "base", tok)
    run = tmp_path / "lora"
    build_trainer(config(base, data[0], run, lora_r=4, max_steps=2, val_fraction=0.0)).fit()
    recorded = json.loads((run / "config.json").read_text())["lora"]["base_sha256"]
    assert len(recorded) == 64
    load_model(run)  # the base as it was: fine
    make_base(tmp_path / "base", tok, seed=1)  # another model written over it
    with pytest.raises(CheckpointError, match="now holds other weights"):
        load_model(run)
    with pytest.raises(CheckpointError, match="--base ORIGINAL"):
        merge_run(run, tmp_path / "merged")
    with pytest.raises(CheckpointError, match="trained on a base with other weights"):
        build_trainer(config(base, data[0], run, lora_r=4, max_steps=4, val_fraction=0.0, resume=True))


def test_a_lora_rank_above_a_layers_dimensions_is_refused_before_anything_runs(
    base: Path, data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli.finetune import sft_main

    out = tmp_path / "lora"
    assert sft_main([str(base), "--data", str(data[0]), "--out", str(out), "--lora-r", "100000"]) == 1
    err = capsys.readouterr().err
    assert "--lora-r 100000 is above the rank a layer it adapts can have: k_proj of this model is 128 x 64" in err
    assert not out.exists()
