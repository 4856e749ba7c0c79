"""Peak memory and step time of full fine-tuning, LoRA and QLoRA on smallm's model presets.

Each (preset, method) pair is measured in a fresh interpreter (``--one PRESET METHOD``, which prints one
JSON line), since peak memory is a property of the whole process. The model is built the way
``smallm-sft`` builds it, from random weights (memory and time do not depend on their values):

* **full**: ``SmallLM`` on the device in fp32, every parameter trained.
* **lora**: the frozen base in the frozen dtype (bf16 on CUDA, where it is only read through bf16
  autocast; fp32 on CPU), then :func:`smallm.model.lora.apply_lora` with r=16, alpha=32 (dropout
  ``--lora-dropout``, default 0 as in ``smallm-sft``) on the
  seven block projections (the adapters are fp32).
* **qlora**: :func:`smallm.model.lora.quantize_nf4` turns the block projections of the CPU-built fp32 model
  into NF4 on the device first, then the rest moves as for LoRA and the same adapters go on.

Besides smallm's presets, ``imported-llama3.2-1b`` is the scenario of starting from someone else's model:
a ``transformers`` ``LlamaForCausalLM`` of Llama 3.2 1B's published shape (16 layers, width 2048, 32
heads, 8 KV heads, MLP 8192, vocabulary 128256, tied, rope theta 500000 with llama3 scaling), random
weights in bf16, saved by ``save_pretrained`` and imported with ``smallm-import``'s
:func:`smallm.interop.hf_import.import_hf` (once, into ``--import-dir``, in a process of its own, with a small
stand-in tokenizer since the folder has none); each measurement opens that run with
:func:`smallm.run.load.load_model`, as ``smallm-sft`` does.

The optimizer is :func:`smallm.train.optim.build_optimizer` under a default
:class:`~smallm.train.config.FinetuneConfig` (AdamW, betas 0.9/0.95, fused on CUDA) over the trainable
parameters. One step is the forward with targets (bf16 autocast on CUDA, fp32 on CPU), the backward,
gradient clipping at 1.0, the optimizer step and ``zero_grad(set_to_none=True)``, on a fixed batch of
random token ids; gradient checkpointing is on unless ``--no-gradient-checkpointing``. After one
warm-up step, ``--steps`` steps are timed; the median gives the step time and tokens per second.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` from a reset at the
start of the process (model build included). On CPU, the peak resident set size (``VmHWM`` in
``/proc/self/status``) twice: over the whole process, and over the training steps alone (the peak is
reset once the model and optimizer exist, by writing 5 to ``/proc/self/clear_refs``), because QLoRA
builds the fp32 model on the CPU before quantizing it, a transient that the training itself never
needs. Both include the interpreter and torch's libraries (the report gives that baseline). The ratios
compare each method with full fine-tuning measured in the same run: memory = peak / full's peak,
speed = full's step time / the method's (above 1 is faster). A run that is killed or fails for lack of
memory is reported as "did not fit" and the bench goes on.

Run from the repository root with smallm and its ``finetune`` extra (peft, torchao) installed::

    python benches/finetune_memory.py                                 # 350m and tinyllama-1.1b, all methods
    python benches/finetune_memory.py --presets 350m --steps 5 --json /tmp/finetune_memory.json
    python benches/finetune_memory.py --skip tinyllama-1.1b:full      # leave out a pair

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, load_average, usable_cores
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.memory import format_count, parameter_count
from torch import nn

METHODS = ("full", "lora", "qlora")
LORA_R, LORA_ALPHA = 16, 32.0
QLORA_TARGET_MIB = 4096  # "QLoRA on 1.1B fits in 4 GB of GPU memory", read as 4 GiB
LORA_SPEED_TARGET = 2.0  # "a LoRA step is at least 2x faster than a full fine-tuning step on 350m"
MEMORY_ERRORS = ("out of memory", "can't allocate memory")
IMPORTED = "imported-llama3.2-1b"
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)  # fmt: skip


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----- one measurement (runs in its own interpreter) ----------------------------------------------


def status_mib(key: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM) in MiB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """The peak resident set size since the start or the last :func:`reset_peak_rss` (``ru_maxrss``,
    which a child inherits from its parent across exec, only where /proc is absent)."""
    peak = status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Sets the peak RSS back to the current RSS (Linux 4.0+); False where that is not possible. Memory
    freed by Python is handed back to the system first, or it would still count as resident."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def volunteer_for_oom_killer() -> None:
    """Makes this process the first the kernel kills when memory runs out, rather than anything else."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def model_config(preset: str, seq_len: int) -> ModelConfig:
    if preset == IMPORTED:
        from smallm.interop.hf_import import model_config_from_hf

        parameters = LLAMA32_1B["rope_parameters"]
        return model_config_from_hf({"model_type": "llama", **LLAMA32_1B, "rope_parameters": parameters})
    return ModelConfig.preset(preset, max_seq_len=max(seq_len, ModelConfig.preset(preset).max_seq_len))


def prepare_import(directory: Path) -> Path:
    """The smallm run imported from a random-weight Llama 3.2 1B-shaped transformers folder (made once)."""
    run = directory / "run"
    if (run / "config.json").is_file():
        return run
    import transformers
    from smallm.interop.hf_import import import_hf

    folder = directory / "hf"
    if not (folder / "config.json").is_file():
        log(f"{IMPORTED}: writing a random-weight LlamaForCausalLM to {folder}")
        config = transformers.LlamaConfig(**LLAMA32_1B)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
    log(f"{IMPORTED}: importing {folder} into {run}")
    start = time.perf_counter()
    import_hf(folder, run, force=True)
    log(f"{IMPORTED}: imported in {time.perf_counter() - start:.0f}s")
    # The folder has no tokenizer (Llama 3's is not ours to ship); opening a run needs one, and its size
    # changes nothing here: the batch is random ids over the model's 128256 rows.
    from smallm.text.tokenizer import Tokenizer

    Tokenizer.train_from_iterator(["a stand-in tokenizer for the benchmark"] * 4, 300).save(run)
    return run


def build(preset: str, method: str, args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Any]:
    """The model with its optimizer, set up for ``method`` as ``smallm-sft`` sets it up."""
    from smallm.train.config import FinetuneConfig
    from smallm.train.optim import build_optimizer
    from smallm.train.resolve import resolve_optimization

    torch.manual_seed(0)
    if preset == IMPORTED:
        from smallm.run.load import load_model

        model = load_model(Path(args.import_dir) / "run")[0].train()
    else:
        model = SmallLM(model_config(preset, args.seq_len)).train()
    model.gradient_checkpointing = args.gradient_checkpointing
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if method == "full":
        model.to(device)
    else:
        from smallm.model.lora import LoraSettings, apply_lora, place_frozen_base, quantize_nf4

        if method == "qlora":
            quantize_nf4(model, device, frozen_dtype)
        place_frozen_base(model, device, frozen_dtype)
        apply_lora(model, LoraSettings(r=LORA_R, alpha=LORA_ALPHA, dropout=args.lora_dropout))
    cfg = FinetuneConfig(lora_r=0 if method == "full" else LORA_R, optimizer="adamw")
    return model, build_optimizer(model, resolve_optimization(cfg, model.config, device), device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: Any, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """One optimizer step on the fixed batch; returns its wall time in seconds."""
    device = ids.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _, loss = model(ids, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def measure(preset: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if method != "full":
        import peft  # noqa: F401  (its import, transformers' included, goes into the baseline)
    baseline = status_mib("VmRSS")
    log(f"{preset} {method}: building")
    model, optimizer = build(preset, method, args, device)
    build_peak = peak_rss_mib()
    steps_reset = reset_peak_rss()
    resident = status_mib("VmRSS")
    config = model.config
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator)
    ids, targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    warmup = []
    for i in range(args.warmup):
        warmup.append(train_step(model, optimizer, ids, targets))
        log(f"{preset} {method}: warm-up step {i + 1}/{args.warmup} {warmup[-1]:.2f}s")
    seconds = []
    for i in range(args.steps):
        seconds.append(train_step(model, optimizer, ids, targets))
        log(f"{preset} {method}: step {i + 1}/{args.steps} {seconds[-1]:.2f}s")
    steps_peak = peak_rss_mib()
    result = {
        "preset": preset,
        "method": method,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup_seconds": warmup,
        "step_seconds": seconds,
        "median_step_s": statistics.median(seconds),
        "tokens_per_s": ids.numel() / statistics.median(seconds),
        "baseline_rss_mib": baseline,
        "rss_before_steps_mib": resident,
        "process_peak_rss_mib": max(build_peak, steps_peak),
        "steps_peak_rss_mib": steps_peak if steps_reset else None,
    }
    if device.type == "cuda":
        result["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return result


def one(preset: str, method: str, args: argparse.Namespace) -> None:
    """The ``--one`` mode: measures one pair and prints its JSON line (an ``error`` field if it fails
    for lack of memory; other errors propagate)."""
    volunteer_for_oom_killer()
    try:
        result = measure(preset, method, args)
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not any(m in str(e) for m in MEMORY_ERRORS):
            raise
        result = {"preset": preset, "method": method, "error": f"did not fit ({str(e).splitlines()[0][:120]})"}
    print(json.dumps(result), flush=True)


# ----- the driver ---------------------------------------------------------------------------------


def run_in_subprocess(preset: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs ``--one`` in a fresh interpreter and returns its result, or an ``error`` saying why none came."""
    flags = [
        f"--device={args.device}", f"--warmup={args.warmup}", f"--steps={args.steps}", f"--seq-len={args.seq_len}",
        f"--batch-size={args.batch_size}", f"--threads={args.threads}", f"--lora-dropout={args.lora_dropout}",
        f"--import-dir={args.import_dir}",
        "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
    ]  # fmt: skip
    command = [sys.executable, str(Path(__file__).resolve()), "--one", preset, method, *flags]
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1])
    elif proc.returncode == -9:
        result = {"error": "did not fit (killed by SIGKILL: the out-of-memory killer)"}
    else:
        result = {"error": f"failed (exit code {proc.returncode}; see stderr)"}
    result.update(preset=preset, method=method, wall_s=time.perf_counter() - start)
    log(f"{preset} {method}: {result.get('error') or 'done'} in {result['wall_s']:.0f}s")
    return result


def peak_mib(result: dict[str, Any]) -> float | None:
    """The figure the table compares: GPU peak allocated on CUDA, else the peak RSS of the steps."""
    if "error" in result:
        return None
    return result.get("gpu_peak_allocated_mib") or result["steps_peak_rss_mib"] or result["process_peak_rss_mib"]


def ratio(value: float | None, anchor: float | None) -> str:
    return f"{value / anchor:.2f}x" if value and anchor else "n/a"


def preset_table(results: list[dict[str, Any]], cuda: bool) -> str:
    full = next((r for r in results if r["method"] == "full" and "error" not in r), None)
    full_peak = peak_mib(full) if full else None
    full_step = full["median_step_s"] if full else None
    first = "peak allocated MiB" if cuda else "peak RSS MiB (steps)"
    memory = [first, "peak reserved MiB"] if cuda else [first, "process peak RSS MiB", "RSS before steps MiB"]
    headers = ["method", "trainable params", *memory, "step s", "tokens/s", "memory vs full", "speed vs full"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in results:
        if "error" in r:
            cells = [r["method"], "-", r["error"]] + ["-"] * (len(headers) - 3)
        else:
            others = [r["gpu_peak_reserved_mib"]] if cuda else [r["process_peak_rss_mib"], r["rss_before_steps_mib"]]
            cells = [
                r["method"], format_count(r["trainable"]), f"{peak_mib(r):,.0f}", *(f"{v:,.0f}" for v in others),
                f"{r['median_step_s']:.2f}", f"{r['tokens_per_s']:,.0f}", ratio(peak_mib(r), full_peak),
                ratio(full_step, r["median_step_s"]),
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def find(results: list[dict[str, Any]], preset: str, method: str) -> dict[str, Any] | None:
    return next((r for r in results if r["preset"] == preset and r["method"] == method), None)


def check_targets(results: list[dict[str, Any]], cuda: bool) -> list[str]:
    lines = []
    qlora = find(results, "tinyllama-1.1b", "qlora")
    target = f"QLoRA on tinyllama-1.1b <= 4 GB peak GPU memory (read as {QLORA_TARGET_MIB} MiB reserved)"
    if qlora is None or "error" in qlora:
        lines.append(f"- {target}: not measured ({qlora['error'] if qlora else 'not in this run'})")
    elif cuda:
        reserved, allocated = qlora["gpu_peak_reserved_mib"], qlora["gpu_peak_allocated_mib"]
        verdict = "PASS" if reserved <= QLORA_TARGET_MIB else "FAIL"
        lines.append(f"- {target}: {verdict} ({reserved:,.0f} MiB reserved, {allocated:,.0f} MiB allocated)")
    else:
        steps = qlora["steps_peak_rss_mib"]
        lines.append(
            f"- {target}: a GPU target, not decidable on CPU. CPU peak RSS here: "
            f"{steps:,.0f} MiB over the steps, {qlora['process_peak_rss_mib']:,.0f} MiB over the process "
            "(the interpreter, torch and peft included)"
            if steps
            else f"- {target}: a GPU target; CPU process peak RSS {qlora['process_peak_rss_mib']:,.0f} MiB"
        )
    full, lora = find(results, "350m", "full"), find(results, "350m", "lora")
    target = f"LoRA step >= {LORA_SPEED_TARGET:.0f}x faster than full fine-tuning on 350m"
    if full is None or lora is None or "error" in full or "error" in lora:
        lines.append(f"- {target}: not measured (needs both 350m full and lora in the run)")
    else:
        speedup = full["median_step_s"] / lora["median_step_s"]
        verdict = "PASS" if speedup >= LORA_SPEED_TARGET else "FAIL"
        lines.append(
            f"- {target}: {verdict} ({speedup:.2f}x: full {full['median_step_s']:.2f} s, "
            f"LoRA {lora['median_step_s']:.2f} s per step, {'GPU' if cuda else 'CPU'})"
        )
    return lines


def load_text() -> str:
    return " / ".join(f"{v:.2f}" for v in load_average() or ()) or "n/a"


def machine(device: torch.device, start_load: str) -> str:
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{cpu_model()}, {usable_cores()} usable cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}{gpu}; load average {start_load} at the start, {load_text()} at the end"
    )


def report(args: argparse.Namespace, results: list[dict[str, Any]], started: float, start_load: str) -> None:
    cuda = args.device.startswith("cuda")
    precision = "bf16 autocast, frozen base in bf16" if cuda else "fp32"
    print(f"machine: {machine(torch.device(args.device), start_load)}")
    print(
        f"settings: {args.device}, {precision}, {args.threads} threads, batch {args.batch_size} x {args.seq_len}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.warmup} warm-up + "
        f"{args.steps} timed steps, AdamW (build_optimizer), "
        f"LoRA r={LORA_R} alpha={LORA_ALPHA:.0f} dropout {args.lora_dropout} "
        "on all 7 block projections, QLoRA = NF4 (torchao) base + the same LoRA"
    )
    baselines = {r["method"]: r["baseline_rss_mib"] for r in results if r.get("baseline_rss_mib")}
    if baselines and not cuda:
        listed = ", ".join(f"{m} {v:,.0f}" for m, v in baselines.items())
        print(f"RSS before the model is built (interpreter, torch; peft for LoRA/QLoRA), in every figure: {listed} MiB")
    for preset in args.presets:
        rows = [r for r in results if r["preset"] == preset]
        size = format_count(parameter_count(model_config(preset, args.seq_len)))
        print(f"\n### {preset}, {size} parameters\n")
        print(preset_table(rows, cuda))
    print("\ntargets:")
    print("\n".join(check_targets(results, cuda)))
    wall = time.time() - started
    print(f"\nstep s: median of the timed steps; speed vs full above 1x is faster. Wall time {wall:.0f} s.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="350m,tinyllama-1.1b", help="comma-separated model presets")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of full,lora,qlora")
    parser.add_argument("--skip", default="", help="PRESET:METHOD pairs to leave out, e.g. tinyllama-1.1b:full")
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up one (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default: 0, as smallm-sft)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="CPU threads (default: usable cores)")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
        help="recompute block activations in the backward pass (default: on)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="also write the settings and every result as JSON here")
    parser.add_argument(
        "--import-dir", default="/tmp/smallm-bench-llama3.2-1b",
        help=f"where {IMPORTED} keeps its transformers folder and imported run (made on first use)",
    )  # fmt: skip
    parser.add_argument("--prepare-import", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.steps is None:
        args.steps = 20 if args.device.startswith("cuda") else 3
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.skip = {tuple(pair.strip().split(":", 1)) for pair in args.skip.split(",") if pair.strip()}
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    for preset in args.presets:
        if preset != IMPORTED:
            ModelConfig.preset(preset)  # unknown names fail here, before any subprocess
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        one(*args.one, args)
        return
    if args.prepare_import:
        prepare_import(Path(args.import_dir))
        return
    started, start_load = time.time(), load_text()
    if IMPORTED in args.presets:  # in a process of its own, so that its memory is gone before the measurements
        command = [sys.executable, str(Path(__file__).resolve()), "--prepare-import", f"--import-dir={args.import_dir}"]
        subprocess.run(command, check=True)
    results = []
    for preset in args.presets:
        for method in args.methods:
            if (preset, method) in args.skip:
                results.append({"preset": preset, "method": method, "error": "skipped (--skip)"})
                continue
            results.append(run_in_subprocess(preset, method, args))
    report(args, results, started, start_load)
    if args.json:
        settings = {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items() if k != "one"}
        payload = {"machine": machine(torch.device(args.device), start_load), "settings": settings, "results": results}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=list) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
