"""The plan's estimated peak memory against the peak measured over real training steps, on this machine.

For each kind of run (SFT, DPO, reward model) in full, with LoRA and with QLoRA, with activation
checkpointing off and on, on the demo model's shape (the ``tiny`` preset, vocabulary 8,192), and for LoRA
and QLoRA SFT on Llama 3.2 1B's published shape (16 layers, width 2048, 32 heads, 8 KV heads, MLP 8192,
vocabulary 128,256, tied; random weights, written by transformers and imported with ``smallm-import``'s
code), :func:`smallm.train.plan.plan_run` measures ``--steps`` real steps of the real trainer: on the CPU the
peak is the running sum of the allocations and frees the PyTorch profiler records, on CUDA
``torch.cuda.max_memory_allocated``. The ratio is measured / estimated (the estimate is meant to be an
upper bound close to the peak). The data are conversations and pairs that fill the context.

    python benches/plan_vs_measured.py                      # both shapes, CPU
    python benches/plan_vs_measured.py --skip-1b --device cuda

Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, usable_cores
from smallm.data.builtin import builtin_corpus
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import write_run
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig
from smallm.train.plan import plan_run

CLASSES = {"sft": FinetuneConfig, "dpo": DPOConfig, "rm": RewardConfig}
MODES = {"full": {}, "lora": {"lora_r": 16}, "qlora": {"lora_r": 16, "quantize": "nf4"}}
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=500000.0,
)  # fmt: skip


def write_data(folder: Path, tokenizer: Tokenizer, seq_len: int) -> tuple[Path, Path]:
    """Conversations and pairs of stdlib source lines, each side about ``seq_len`` - 24 tokens long."""
    lines = [line.strip() for line in (Path(json.__file__).parent / "encoder.py").read_text().splitlines()]
    lines = [line for line in lines if len(line) > 20]
    chats, pairs = folder / "chats.jsonl", folder / "pairs.jsonl"

    def answer(start: int) -> str:
        text, i = "", start
        while len(tokenizer.encode(text)) < seq_len - 40:
            text += lines[i % len(lines)] + "\n"
            i += 1
        return text

    with open(chats, "w", encoding="utf-8") as c, open(pairs, "w", encoding="utf-8") as p:
        for i in range(16):
            question = f"What does line {i} of json/encoder.py say?"
            chosen, rejected = answer(i), answer(i + 7)
            turn = [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}]
            c.write(json.dumps({"messages": turn}) + "\n")
            p.write(json.dumps({"prompt": question, "chosen": chosen, "rejected": rejected}) + "\n")
    return chats, pairs


def measure(kind: str, mode: str, ckpt: bool, base: Path, data: tuple[Path, Path], args: Any, batch: int) -> dict:
    cfg = CLASSES[kind](
        init_from=str(base), data=str(data[0] if kind == "sft" else data[1]), out=str(base.parent / "out"),
        batch_size=batch, seq_len=args.seq_len, device=args.device, max_steps=args.steps,
        activation_checkpointing=ckpt, **MODES[mode],
    )  # fmt: skip
    started = time.perf_counter()
    plan = plan_run(cfg, measure_steps=args.steps)
    assert plan.measured is not None and plan.measured.peak is not None
    ratio = plan.measured.peak / plan.estimate.peak
    print(f"{kind} {mode} ckpt={ckpt}: {ratio:.3f} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {"estimated": plan.estimate.peak, "measured": plan.measured.peak, "ratio": ratio}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--skip-1b", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(usable_cores())
    tokenizer = Tokenizer.load(builtin_corpus())
    rows: list[tuple[str, str, str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_data(root, tokenizer, args.seq_len)
        torch.manual_seed(0)
        demo = SmallLM(ModelConfig.preset("tiny", vocab_size=8192, max_seq_len=args.seq_len))
        base = write_run(
            root / "demo" / "base", demo, tokenizer, {"train": {}, "model": dataclasses.asdict(demo.config)}
        )
        for kind in CLASSES:
            for mode in MODES:
                for ckpt in (False, True):
                    rows.append(("tiny (demo)", f"{kind} {mode}", "on" if ckpt else "off",
                                 measure(kind, mode, ckpt, base, data, args, 4)))  # fmt: skip
        if not args.skip_1b:
            import transformers
            from smallm.interop.hf_import import import_hf

            folder = root / "llama-1b"
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA32_1B)).save_pretrained(folder)
            tokenizer.save(folder)
            imported = import_hf(folder, root / "imported" / "base")
            for mode in ("lora", "qlora"):
                rows.append(("Llama 3.2 1B shape (imported)", f"sft {mode}", "on",
                             measure("sft", mode, True, imported, data, args, 1)))  # fmt: skip
    where = "GPU " + torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_model()
    print(f"plan vs measured peak on {where}, torch {torch.__version__}, seq_len {args.seq_len}, {args.steps} steps\n")
    print("| model | run | checkpointing | estimated | measured | measured / estimated |")
    print("|---|---|---|---:|---:|---:|")
    for model, run, ckpt, r in rows:
        est, meas = r["estimated"] / 2**20, r["measured"] / 2**20
        print(f"| {model} | {run} | {ckpt} | {est:,.1f} MiB | {meas:,.1f} MiB | {r['ratio']:.3f} |")
    ratios = [r["ratio"] for *_, r in rows]
    print(f"\nratios from {min(ratios):.3f} to {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
