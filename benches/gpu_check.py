"""Every CUDA path of smallm, exercised once on one GPU, in one table: run it whenever a GPU is at hand.

Checks, in order (each on a shard directory built here from the Python standard library, so nothing is
downloaded):

1. ``124m`` pretraining in bf16 with ``torch.compile``, under Muon and under AdamW: tokens/s and MFU over
   the steps after the first log line (compilation is left out), peak GPU memory;
2. the same without compile, activation checkpointing off and on: tokens/s and peak memory;
3. resume: a run interrupted after its checkpoint and resumed must reach the uninterrupted run's weights
   (the largest difference is reported; bitwise on the CPU, kernels may differ in the last bits on CUDA);
4. ``tinyllama-1.1b`` QLoRA (NF4 base, LoRA r=16, bf16, activation checkpointing, batch 1 x 512): peak
   GPU memory (the target is 4 GB) and seconds per step;
5. generation: smallm against transformers' ``generate`` on the model of check 1, bf16, greedy: new
   tokens per second and whether both gave the same ids;
6. Muon's overhead: check 1's AdamW tokens/s over Muon's (above 1: Muon's step costs that much more);
7. plans against reality: ``smallm.train.plan.plan_run`` for SFT in full, LoRA and QLoRA (with activation
   checkpointing), DPO in full and the reward model with LoRA, on the QLoRA check's base, with 3 measured
   steps each: the estimated peak, ``torch.cuda.max_memory_allocated`` over those steps, their ratio
   (fails outside 0.7-1.25: the estimate counts no CUDA workspace or fragmentation) and seconds per step
   measured against the plan's estimate for this GPU.

Any check that raises fails the run (exit code 1) after the table is printed, with the traceback on
stderr: none of these paths may be skipped quietly. Needs about 8 minutes on an H100 and ~15 GB of host
memory (the 1.1B base is built and written in fp32 before it is quantized).

    pip install --no-deps dist/smallm-*.whl && python benches/gpu_check.py
    python benches/gpu_check.py --device cpu --quick        # the same code on small shapes, no CUDA

Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model
from generate_vs_transformers import SETTINGS, hf_generate, smallm_generate, timed_pair, transformers_twin
from smallm.data.shards import PackOptions, pack_corpus
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.checkpoint import latest_checkpoint, load_weights
from smallm.run.write import write_run
from smallm.text.corpus import Corpus, stdlib_sources
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import FinetuneConfig, TrainConfig
from smallm.train.jobs import build_trainer

Row = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_data(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    corpus = Corpus(files=stdlib_sources())
    tokenizer = Tokenizer.train_from_corpus(corpus, 8192)
    tokenizer.save(data)
    pack_corpus(corpus, tokenizer, data, PackOptions(val_fraction=0.01), progress=False)
    return data


def peak_memory(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def pretrain(args: argparse.Namespace, data: Path, out: Path, **settings: Any) -> tuple[Row, Any]:
    """A short run of the check's preset; tokens/s and MFU from the last log line."""
    values: dict[str, Any] = dict(
        data=str(data), out=str(out), preset=args.preset, device=args.device, precision=args.precision,
        batch_size=args.batch_size, seq_len=args.seq_len, batch_tokens=args.batch_size * args.seq_len * 2,
        max_steps=args.steps, log_every=max(1, args.steps // 3), eval_every=0, eval_batches=4,
        checkpoint_every=args.steps, sample_tokens=8,
    )  # fmt: skip
    values.update(settings)
    device = torch.device(args.device)
    reset_peak(device)
    trainer = build_trainer(TrainConfig(**values))
    trainer.fit()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in lines if "tokens_per_s" in r][-1]
    row = {"tokens/s": last["tokens_per_s"], "MFU": last.get("mfu"), "peak GB": peak_memory(device)}
    return row, trainer


def check_resume(args: argparse.Namespace, data: Path, root: Path) -> Row:
    settings = dict(compile=False, max_steps=8, checkpoint_every=4, log_every=4)
    pretrain(args, data, root / "whole", **settings)
    interrupted = root / "interrupted"
    pretrain(args, data, interrupted, **settings)
    shutil.rmtree(interrupted / "checkpoints" / "step_00000008")
    (interrupted / "checkpoints" / "latest").unlink()
    pretrain(args, data, interrupted, resume=True, **settings)
    a = load_weights(latest_checkpoint(root / "whole"))
    b = load_weights(latest_checkpoint(interrupted))
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    if not diff < 1e-2:
        raise AssertionError(f"the resumed run's weights differ from the uninterrupted run's by {diff}")
    return {"max |weight diff|": diff, "bitwise": all(torch.equal(a[k], b[k]) for k in a)}


def check_qlora(args: argparse.Namespace, data: Path, root: Path) -> Row:
    tokenizer = Tokenizer.load(data)
    log("building the fp32 base on the CPU and writing it")
    torch.manual_seed(0)
    base = SmallLM(ModelConfig.preset(args.qlora_preset))
    base_dir = write_run(root / "base", base, tokenizer, {"train": {}, "model": dataclasses.asdict(base.config)})
    seq_len = min(512, base.config.max_seq_len)  # the tiny preset of --quick has a context of 256
    del base
    chats = root / "chats.jsonl"
    with open(chats, "w", encoding="utf-8") as f:
        for i in range(64):
            turn = [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
            f.write(json.dumps({"messages": turn}) + "\n")
    device = torch.device(args.device)
    reset_peak(device)
    cfg = FinetuneConfig(
        init_from=str(base_dir), data=str(chats), out=str(root / "qlora"), lora_r=16, quantize="nf4",
        precision=args.precision, device=args.device, batch_size=1, seq_len=seq_len, max_steps=4, log_every=2,
        activation_checkpointing=True, sample_tokens=4, val_fraction=0.0,
    )  # fmt: skip
    start = time.perf_counter()
    build_trainer(cfg).fit()
    args.plan_base = base_dir
    return {"peak GB": peak_memory(device), "s/step": (time.perf_counter() - start) / cfg.max_steps}


def check_plans(args: argparse.Namespace, root: Path) -> Row:
    """The plan's estimated peak against the measured one for five kinds of run (see the module docstring)."""
    from smallm.train.config import DPOConfig, RewardConfig
    from smallm.train.plan import ASSUMED_MFU, plan_run

    base = getattr(args, "plan_base", None)
    if base is None:
        raise RuntimeError("the QLoRA check did not leave its base")
    seq_len = 256 if args.quick else 512
    words = "the plan counts every tensor a step keeps and checks it against the allocator".split()  # noqa: SIM905
    tokenizer = Tokenizer.load(Path(base))

    def answer(spare: int) -> str:
        """Words until the answer takes the context less ``spare`` tokens: the pairs' rows are padded only to
        the longest of a batch, and the plan assumes full rows."""
        n = 1
        while len(tokenizer.encode(" ".join(words[i % len(words)] for i in range(n)))) < seq_len - spare:
            n += 1
        return " ".join(words[i % len(words)] for i in range(n))

    chats, pairs = root / "long-chats.jsonl", root / "long-pairs.jsonl"
    with open(chats, "w", encoding="utf-8") as c, open(pairs, "w", encoding="utf-8") as p:
        for i in range(32):
            turn = [{"role": "user", "content": f"Say it {i}."}, {"role": "assistant", "content": answer(40)}]
            c.write(json.dumps({"messages": turn}) + "\n")
            p.write(json.dumps({"prompt": f"Say it {i}.", "chosen": answer(40),
                                "rejected": answer(45)}) + "\n")  # fmt: skip
    kinds = [("sft full", FinetuneConfig, {}), ("sft LoRA", FinetuneConfig, {"lora_r": 16}),
             ("sft QLoRA", FinetuneConfig, {"lora_r": 16, "quantize": "nf4"}), ("dpo full", DPOConfig, {}),
             ("rm LoRA", RewardConfig, {"lora_r": 16})]  # fmt: skip
    row: Row = {}
    worst = 1.0
    for name, cls, settings in kinds:
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        cfg = cls(init_from=str(base), data=str(chats if cls is FinetuneConfig else pairs), out=str(root / "plan"),
                  device=args.device, precision=args.precision, batch_size=2, seq_len=seq_len, max_steps=3,
                  activation_checkpointing=True, val_fraction=0.0, **settings)  # fmt: skip
        plan = plan_run(cfg, measure_steps=3)
        if plan.measured is None or plan.measured.peak is None:
            raise RuntimeError(f"{name}: nothing measured ({plan.text()})")
        ratio = plan.measured.peak / plan.estimate.peak
        worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
        peak = torch.cuda.get_device_properties(0).total_memory if args.device.startswith("cuda") else 0
        row[name] = (f"{plan.estimate.peak / 2**30:.2f} GB est, {plan.measured.peak / 2**30:.2f} GB measured "
                     f"({ratio:.2f}), {plan.measured.seconds_per_step:.3g} s/step")  # fmt: skip
        if peak:
            flops = plan.estimate.flops_per_step / (plan.measured.seconds_per_step or float("inf"))
            row[name] += f" ({flops / 1e12:.0f} TFLOP/s run; the plan assumes {ASSUMED_MFU:.0%} of the peak)"
    if not 0.7 <= worst <= 1.25:
        raise AssertionError(f"an estimated peak is off by {worst:.2f}x: {row}")
    return row


def check_generation(args: argparse.Namespace, model: torch.nn.Module) -> Row:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    twin = transformers_twin(model)
    prompts = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    sampling = SETTINGS["greedy"]
    t_ours, t_hf, ours, theirs = timed_pair(
        lambda: smallm_generate(model, prompts, 128, sampling, 0), lambda: hf_generate(twin, prompts, 128, sampling, 0),
        3, device,
    )  # fmt: skip
    tokens = prompts.size(0) * 128
    return {"smallm tokens/s": tokens / t_ours, "transformers tokens/s": tokens / t_hf, "ratio": t_hf / t_ours,
            "same ids": bool(torch.equal(ours.cpu(), theirs.cpu()))}  # fmt: skip


def run_check(name: str, rows: list[tuple[str, Row | str]], body: Callable[[], Row]) -> None:
    log(f"== {name}")
    start = time.perf_counter()
    try:
        row = body()
        row["seconds"] = time.perf_counter() - start
        rows.append((name, row))
    except Exception as e:  # every failure is reported, none stops the other checks
        traceback.print_exc()
        rows.append((name, f"FAILED: {type(e).__name__}: {e}"))


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run of this script's code)")
    p.add_argument("--keep", type=Path, help="keep the runs in this directory")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available; this check exists to run on a GPU", file=sys.stderr)
        return 1
    args.preset, args.qlora_preset = ("tiny", "tiny") if args.quick else ("124m", "tinyllama-1.1b")
    args.batch_size, args.seq_len = (2, 128) if args.quick else (16, 1024)
    args.steps = 6 if args.quick else 30
    args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    root = args.keep or Path(tempfile.mkdtemp(prefix="smallm-gpu-check-"))
    rows: list[tuple[str, Row | str]] = []
    started = time.perf_counter()
    device = "GPU " + torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_model()
    log(f"{device}, torch {torch.__version__}; runs in {root}")
    data = build_data(root)
    trained: dict[str, Any] = {}

    def compiled(optimizer: str) -> Row:
        row, trainer = pretrain(args, data, root / f"compile-{optimizer}", optimizer=optimizer, compile=True)
        trained["model"] = trainer.model.module
        return row

    run_check(f"{args.preset} bf16 compile, Muon", rows, lambda: compiled("muon"))
    run_check(f"{args.preset} bf16 compile, AdamW", rows, lambda: compiled("adamw"))
    for checkpointing in (False, True):
        run_check(
            f"{args.preset} activation checkpointing {'on' if checkpointing else 'off'}", rows,
            lambda c=checkpointing: pretrain(args, data, root / f"ckpt-{c}", activation_checkpointing=c)[0],
        )  # fmt: skip
    run_check("resume after a checkpoint", rows, lambda: check_resume(args, data, root / "resume"))
    run_check(f"{args.qlora_preset} QLoRA (NF4, r=16)", rows, lambda: check_qlora(args, data, root / "qlora"))

    def generation() -> Row:
        model = trained.get("model") or SmallLM(ModelConfig.preset(args.preset, vocab_size=8192)).to(args.device)
        return check_generation(args, model)

    run_check("generation vs transformers (greedy)", rows, generation)

    def muon_overhead() -> Row:
        by_name = {name: row for name, row in rows if not isinstance(row, str)}
        muon, adamw = (by_name.get(f"{args.preset} bf16 compile, {o}") for o in ("Muon", "AdamW"))
        if not muon or not adamw:
            raise RuntimeError("check 1 failed: no Muon or AdamW figure")
        return {"AdamW tokens/s over Muon's": adamw["tokens/s"] / muon["tokens/s"], "MFU Muon": muon["MFU"],
                "MFU AdamW": adamw["MFU"]}  # fmt: skip

    run_check("Muon's step cost against AdamW's (compiled)", rows, muon_overhead)
    run_check("plans: estimated against measured peak", rows, lambda: check_plans(args, root))
    print(f"smallm GPU check on {device}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s\n")
    print("| check | result |")
    print("|---|---|")
    for name, row in rows:
        cell = row if isinstance(row, str) else ", ".join(f"{k} {format_value(v)}" for k, v in row.items())
        print(f"| {name} | {cell} |")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    failed = [name for name, row in rows if isinstance(row, str)]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED: {', '.join(failed)} (tracebacks above, on stderr)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
