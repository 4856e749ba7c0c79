"""The plan of a run (``--dry-run`` of smallm-sft, smallm-dpo and smallm-rm; the dashboard's Plan button): its
estimated peak memory against the peak the allocator measures over real steps of the real trainer, for every
kind of run (full, LoRA, QLoRA; with and without activation checkpointing) on the demo model's shape and on
a 1B-class imported shape; the suggestions that make a run fit; and what the command prints and leaves.

Tolerance: the estimate is meant as an upper bound that is not much of one: the measured peak must lie
between :data:`LOW` and :data:`HIGH` times the estimated one.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from smallm.cli.finetune import dpo_main, rm_main, sft_main
from smallm.data.conversations import encode_conversation
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run
from smallm.text.chat import with_chat_format
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig, TrainConfig
from smallm.train.plan import plan_run, suggestions
from smallm.train.plan_memory import StepShape, estimate_step

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

LOW, HIGH = 0.90, 1.05
SEQ_LEN = 128
CLASSES = {"sft": FinetuneConfig, "dpo": DPOConfig, "rm": RewardConfig}
MODES = {"full": {}, "lora": {"lora_r": 16}, "qlora": {"lora_r": 16, "quantize": "nf4"}}
WORDS = "the model reads a file of conversations and learns to answer each question in plain words".split()  # noqa: SIM905


def text_of(tok: Tokenizer, budget: int, rng: random.Random) -> str:
    """Words until ``budget`` tokens are used (about)."""
    words: list[str] = []
    while len(tok.encode(" ".join(words))) < budget:
        words.append(rng.choice(WORDS))
    return " ".join(words)


@pytest.fixture(scope="module")
def long_data(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Conversations and pairs that nearly fill :data:`SEQ_LEN` (pairs are padded to the batch's longest,
    conversations packed, so the rows are as long as the plan assumes)."""
    chat = with_chat_format(tok)
    rng, folder = random.Random(0), tmp_path_factory.mktemp("plan-data")
    chats, pairs = folder / "chats.jsonl", folder / "pairs.jsonl"
    with open(chats, "w") as c, open(pairs, "w") as p:
        for _ in range(24):
            question = text_of(tok, 20, rng)
            for _ in range(20):  # answers as long as the context allows, with both sides fitting
                answers = [text_of(tok, SEQ_LEN - 40, rng) for _ in range(2)]
                lengths = [
                    len(encode_conversation(chat, [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": a}]).ids)
                    for a in answers
                ]  # fmt: skip
                if max(lengths) <= SEQ_LEN - 1:
                    break
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answers[0]}]
            c.write(json.dumps({"messages": messages}) + "\n")
            p.write(json.dumps({"prompt": question, "chosen": answers[0], "rejected": answers[1]}) + "\n")
    return chats, pairs


def base_run(directory: Path, tok: Tokenizer, config: ModelConfig) -> Path:
    torch.manual_seed(0)
    model = SmallLM(config)
    return write_run(directory, model, tok, {"train": {}, "model": dataclasses.asdict(config)}, force=True)


@pytest.fixture(scope="module")
def demo_base(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's model shape: the tiny preset with its 8,192-entry vocabulary."""
    shape = ModelConfig.preset("tiny", vocab_size=8192, max_seq_len=SEQ_LEN)
    return base_run(tmp_path_factory.mktemp("demo") / "base", tok, shape)


def cfg_of(kind: str, base: Path, data: tuple[Path, Path], out: Path, **settings: Any) -> FinetuneConfig:
    values: dict[str, Any] = dict(
        init_from=str(base), data=str(data[0] if kind == "sft" else data[1]), out=str(out), batch_size=4,
        seq_len=SEQ_LEN, device="cpu", max_steps=5,
    )  # fmt: skip
    values.update(settings)
    return CLASSES[kind](**values)


def check_peak(cfg: FinetuneConfig) -> float:
    plan = plan_run(cfg, measure_steps=2)
    assert plan.measured is not None and plan.measured.peak is not None
    ratio = plan.measured.peak / plan.estimate.peak
    measured, estimated = plan.measured.peak / 2**20, plan.estimate.peak / 2**20
    print(f"{cfg.command} {plan.shape.mode} ckpt={plan.shape.activation_checkpointing}: measured {measured:.1f} "
          f"MiB, estimated {estimated:.1f} MiB, {ratio:.3f}")  # fmt: skip
    assert LOW <= ratio <= HIGH, plan.text()
    return ratio


FAST = [("sft", "full", False), ("sft", "lora", True), ("dpo", "qlora", False), ("rm", "full", True),
        ("dpo", "full", False)]  # fmt: skip
ALL = [(k, m, c) for k in CLASSES for m in MODES for c in (False, True)]


@pytest.mark.parametrize(("kind", "mode", "checkpointing"), FAST)
def test_the_estimated_peak_holds_the_measured_one_on_the_demo_shape(
    kind: str, mode: str, checkpointing: bool, demo_base: Path, long_data: tuple[Path, Path], tmp_path: Path
) -> None:
    check_peak(cfg_of(kind, demo_base, long_data, tmp_path / "out", activation_checkpointing=checkpointing,
                      **MODES[mode]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode", "checkpointing"), [c for c in ALL if c not in FAST])
def test_the_estimated_peak_holds_for_every_kind_of_run(
    kind: str, mode: str, checkpointing: bool, demo_base: Path, long_data: tuple[Path, Path], tmp_path: Path
) -> None:
    check_peak(cfg_of(kind, demo_base, long_data, tmp_path / "out", activation_checkpointing=checkpointing,
                      **MODES[mode]))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_the_estimated_peak_holds_on_a_1b_class_imported_shape(
    mode: str, tok: Tokenizer, long_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """Llama 3.2 1B's layer width, heads and 128,256-entry vocabulary (two of its 16 layers, to stay quick),
    imported from a transformers folder as smallm-import does."""
    transformers = pytest.importorskip("transformers")
    from smallm.interop.hf_import import import_hf

    hf_config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=SEQ_LEN, tie_word_embeddings=True, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
    tok.save(folder)
    run = import_hf(folder, tmp_path / "imported")
    check_peak(cfg_of("sft", run, long_data, tmp_path / "out", batch_size=1, **MODES[mode]))


def test_the_plan_names_every_item_and_the_gpus(demo_base: Path, long_data: tuple[Path, Path], tmp_path: Path) -> None:
    plan = plan_run(cfg_of("dpo", demo_base, long_data, tmp_path / "out", precision="auto"), measure_steps=0)
    text = plan.text()
    for item in ("weights (fp32)", "gradients", "optimizer state (adamw)", "DPO's reference model", "activations",
                 "logits", "peak (estimated)", "H100 80GB | bf16", "T4 16GB | fp16", "FLOPs per step"):  # fmt: skip
        assert item in text, item
    assert plan.steps == 5 and plan.measured is None
    assert sum(n for _, n in plan.estimate.items) >= plan.estimate.peak


def test_lora_and_qlora_shrink_the_weights_and_train_few_parameters() -> None:
    llama = ModelConfig(vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, intermediate_size=8192,
                        max_seq_len=2048, tie_embeddings=True)  # fmt: skip
    shape = StepShape(kind="sft", batch_size=1, seq_len=1024, precision="bf16", activation_checkpointing=True)
    full = estimate_step(llama, shape)
    lora = estimate_step(llama, dataclasses.replace(shape, mode="lora", lora_r=16))
    qlora = estimate_step(llama, dataclasses.replace(shape, mode="qlora", lora_r=16))
    assert full.trained == full.parameters and lora.trained == qlora.trained < full.trained / 50
    assert full.peak > 16 * full.parameters > lora.peak > qlora.peak
    nf4 = dict(qlora.items)["frozen block projections (NF4)"]
    assert nf4 < 0.3 * dict(lora.items)["frozen base (bf16)"]
    assert lora.flops_per_step < full.flops_per_step  # no weight gradients for the frozen base


@pytest.mark.parametrize("budget_gib", [2.0, 6.0, 12.0])
def test_the_suggested_changes_make_the_run_fit(budget_gib: float) -> None:
    llama = ModelConfig(vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, intermediate_size=8192,
                        max_seq_len=2048, tie_embeddings=True)  # fmt: skip
    shape = StepShape(kind="sft", batch_size=8, seq_len=2048, precision="bf16")
    budget = int(budget_gib * 2**30)
    assert estimate_step(llama, shape).peak > budget
    changes = suggestions(llama, shape, budget)
    assert changes and changes[-1][1] <= budget
    assert all(a[1] >= b[1] for a, b in zip(changes, changes[1:]))  # each change lowers the peak


@pytest.mark.parametrize(("main", "kind"), [(sft_main, "sft"), (dpo_main, "dpo"), (rm_main, "rm")])
def test_dry_run_prints_the_plan_and_writes_nothing(
    main: Any, kind: str, demo_base: Path, long_data: tuple[Path, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "run"
    data = long_data[0] if kind == "sft" else long_data[1]
    code = main([str(demo_base), "--data", str(data), "--out", str(out), "--lora-r", "8", "--dry-run",
                 "--dry-run-steps", "2", "--fit-memory", "0.05", "--device", "cpu"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "LoRA r=8" in printed and "measured over 2 warm-up steps" in printed
    assert "does NOT fit in 51.2 MiB" in printed and "to fit, change" in printed


def test_the_estimated_peak_holds_for_pretraining(make_shards: Any, corpus_docs: list[str], tmp_path: Path) -> None:
    shards = make_shards(corpus_docs, vocab=400)
    cfg = TrainConfig(data=str(shards), out=str(tmp_path / "run"), preset="tiny", batch_size=4, seq_len=128,
                      device="cpu", max_steps=5, model={"max_seq_len": 128})  # fmt: skip
    plan = plan_run(cfg, measure_steps=2)
    assert plan.measured is not None and plan.measured.peak is not None
    assert LOW <= plan.measured.peak / plan.estimate.peak <= HIGH, plan.text()
    assert plan.steps == 5 and not (tmp_path / "run").exists()


def test_the_steps_counted_without_a_model_are_the_trainers(
    demo_base: Path, long_data: tuple[Path, Path], tmp_path: Path
) -> None:
    for kind in ("sft", "dpo"):
        cfg = cfg_of(kind, demo_base, long_data, tmp_path / kind, max_steps=0, epochs=2.0, batch_size=3)
        counted = plan_run(cfg, measure_steps=0).steps
        measured = plan_run(cfg, measure_steps=1).measured
        assert measured is not None and counted == measured.max_steps > 1


def test_pretraining_is_told_to_keep_its_batch_tokens() -> None:
    llama = ModelConfig.preset("tinyllama-1.1b")
    shape = StepShape(kind="pretrain", batch_size=8, seq_len=2048, precision="bf16")
    changes = [change for change, _ in suggestions(llama, shape, 20 * 2**30)]
    assert "--batch-size 4 (the same --batch-tokens)" in changes and not any("grad-accum" in c for c in changes)
