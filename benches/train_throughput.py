"""Training throughput of smallm's model against a nanoGPT-style GPT-2 reference of the same size.

One training step is a forward with targets (the loss), the backward and an AdamW step (betas 0.9/0.95,
fused on CUDA), then ``zero_grad(set_to_none=True)``; both models get the same random batch, batch
size, sequence length, precision (autocast over fp32 weights, as in :mod:`smallm.train.trainer`) and
torch.compile setting. Each preset gets a row without torch.compile and one with it (``--compile both``,
the default; ``on`` or ``off`` for one of them). Where compiling fails (no C++ compiler for inductor on
a CPU, an unsupported GPU...) the row says why instead of the numbers, and the run goes on.

Reported per row: the warm-up's seconds (compilation included; less where torch's on-disk compile cache
already holds the graphs), tokens per second from the median step time of ``--steps`` timed steps after
``--warmup`` untimed ones, the ratio smallm / reference (the target is at least 1.0x), and the MFU
(model FLOPs per token from :func:`smallm.train.memory.flops_per_token`; the device's dense peak from
:func:`smallm.train.memory.peak_flops` on CUDA, where the target on an H100 is 50%, and on the CPU the
matmul peak measured here, :func:`smallm.train.memory.measured_peak_flops`) and the peak memory beside
:func:`smallm.train.memory.estimate_training_memory` (an eager-mode estimate; compiled runs need less).

The reference is written here: token and learned position embeddings, ``n_layer`` pre-LayerNorm
blocks of causal self-attention (one fused qkv projection, ``F.scaled_dot_product_attention``) and a
GELU MLP, biases as in GPT-2, a final LayerNorm and an lm_head tied like smallm's. Its size is matched
to smallm's preset: the same width, depth, heads (full multi-head attention) and vocabulary; the MLP
hidden width is chosen so that a reference block has as many parameters as a smallm block (SwiGLU's
three matrices and any GQA saving go into a wider GELU MLP), rounded to a multiple of 64 for
matmul-friendly shapes. The table gives both parameter counts.

Run from the repository root with smallm installed::

    python benches/train_throughput.py                         # CPU: tiny and 38m, B=4, T=256, fp32
    python benches/train_throughput.py --device cuda           # 124m and 350m, B=16, T=1024, bf16
    python benches/train_throughput.py --presets 124m --batch-size 8 --seq-len 2048 --no-compile

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from _machine import cpu_model, load_average, usable_cores
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.memory import (
    estimate_training_memory,
    flops_per_token,
    format_bytes,
    format_count,
    measured_peak_flops,
    mfu,
    peak_flops,
)
from torch import Tensor, nn

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = {"off": (False,), "on": (True,), "both": (False, True)}
"""``--compile``'s values: the torch.compile settings each preset is measured under, a row each."""

# ----- the reference model ------------------------------------------------------------------------


class ReferenceAttention(nn.Module):
    """GPT-2 causal self-attention: fused qkv projection, SDPA, output projection."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class ReferenceBlock(nn.Module):
    """x + attn(LayerNorm(x)), then x + mlp(LayerNorm(x)) with a GELU MLP of width ``hidden``."""

    def __init__(self, d: int, n_head: int, hidden: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = ReferenceAttention(d, n_head)
        self.fc, self.fc_proj = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class ReferenceGPT(nn.Module):
    """A GPT-2-style language model; ``forward(ids, targets)`` returns ``(logits, loss)`` like SmallLM."""

    def __init__(self, config: ModelConfig, hidden: int) -> None:
        super().__init__()
        d, self.vocab_size = config.n_embd, config.vocab_size
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.max_seq_len, d)
        self.blocks = nn.ModuleList(ReferenceBlock(d, config.n_head, hidden) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x)).float()
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def counted_flops_per_token(model: nn.Module, n_layer: int, width: int, seq_len: int) -> int:
    """Training FLOPs per token counted from the linear layers a model holds (lm_head included):
    6 x their weights + 12 x layers x width x seq_len, the count smallm.train.memory.flops_per_token makes."""
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return 6 * matmul + 12 * n_layer * width * seq_len


def reference_hidden(config: ModelConfig) -> int:
    """The GELU MLP width that gives a reference block the parameter count of a smallm block."""
    d, kv, inner = config.n_embd, config.n_kv_head * config.head_dim, config.intermediate_size
    smallm_block = 2 * d * d + 2 * d * kv + 3 * d * inner + 2 * d
    fixed = 4 * d * d + 4 * d + 4 * d + d  # qkv and proj with biases, two LayerNorms, fc_proj's bias
    return max(64, round((smallm_block - fixed) / (2 * d + 1) / 64) * 64)


# ----- timing -------------------------------------------------------------------------------------


class Run:
    """One model with its AdamW, stepping on a fixed batch; records its step times and CUDA peak memory."""

    def __init__(
        self, model: nn.Module, config: ModelConfig, ids: Tensor, targets: Tensor, args: argparse.Namespace,
        compile: bool,
    ) -> None:  # fmt: skip
        self.device, self.ids, self.targets = ids.device, ids, targets
        self.params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = counted_flops_per_token(model, config.n_layer, config.n_embd, ids.size(1))
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused
        )
        self.net = torch.compile(model) if compile else model
        self.amp = AMP_DTYPES[args.precision]
        self.step_seconds: list[float] = []
        self.peak_memory: int | None = None  # bytes during the warm-up, beyond what was allocated before
        self.warmup_seconds = 0.0  # torch.compile compiles during the warm-up

    def step(self) -> float:
        """One timed training step; returns its wall time in seconds."""
        sync(self.device)
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            _, loss = self.net(self.ids, self.targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - start

    def tokens_per_second(self) -> float:
        return self.ids.numel() / statistics.median(self.step_seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def start_run(
    build: Callable[[], nn.Module], config: ModelConfig, ids: Tensor, targets: Tensor, args: argparse.Namespace,
    compile: bool,
) -> Run:  # fmt: skip
    """Builds the model and runs its warm-up steps (torch.compile compiles here), measuring CUDA peak
    memory from before the model existed, so the other model's resident state is not counted."""
    cuda = ids.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ids.device)
    before = torch.cuda.memory_allocated(ids.device) if cuda else 0
    torch.manual_seed(0)
    run = Run(build().to(ids.device).train(), config, ids, targets, args, compile)
    start = time.perf_counter()
    for _ in range(args.warmup):
        run.step()
    run.warmup_seconds = time.perf_counter() - start
    if cuda:
        run.peak_memory = torch.cuda.max_memory_allocated(ids.device) - before
    return run


def failed_row(name: str, args: argparse.Namespace, compile: bool, error: Exception) -> dict[str, str]:
    """The row of a preset whose models did not compile or run: the reason in place of the numbers."""
    reason = (str(error).strip().splitlines() or [""])[0][:160].replace("|", "/")
    row = dict.fromkeys(ROW_HEADERS, "")
    row.update(preset=name, compile="on" if compile else "off", **{"B x T": f"{args.batch_size} x {args.seq_len}"})
    row["tok/s smallm"] = f"failed: {type(error).__name__}: {reason}"
    return row


def run_preset(name: str, args: argparse.Namespace, device: torch.device, compile: bool) -> dict[str, str]:
    """The row of preset ``name`` with or without torch.compile; a failed row where it cannot run."""
    torch._dynamo.reset()  # each row compiles its own models from a clean cache
    try:
        return measure_preset(name, args, device, compile)
    except Exception as e:  # torch.compile raises many types where it cannot work
        print(f"{name}: failed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return failed_row(name, args, compile, e)


def measure_preset(name: str, args: argparse.Namespace, device: torch.device, compile: bool) -> dict[str, str]:
    B, T = args.batch_size, args.seq_len
    context = max(T, ModelConfig.preset(name).max_seq_len)
    config = ModelConfig.preset(name, vocab_size=args.vocab_size, max_seq_len=context)
    hidden = reference_hidden(config)
    generator = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, config.vocab_size, (2, B, T), generator=generator).to(device)
    mode = "compiled" if compile else "eager"
    print(f"{name} ({mode}): warming up ({args.warmup} steps each)", file=sys.stderr, flush=True)
    ours = start_run(lambda: SmallLM(config), config, ids, targets, args, compile)
    ref = start_run(lambda: ReferenceGPT(config, hidden), config, ids, targets, args, compile)
    # Alternate the timed steps, so that a change in the machine's load hits both models alike.
    print(f"{name} ({mode}): timing ({args.steps} steps each, alternating)", file=sys.stderr, flush=True)
    for _ in range(args.steps):
        ours.step_seconds.append(ours.step())
        ref.step_seconds.append(ref.step())
    assert ours.flops_per_token == flops_per_token(config, T)
    dtype = AMP_DTYPES[args.precision] or torch.float32
    peak = measured_peak_flops(dtype) if device.type == "cpu" else peak_flops(device, dtype)
    ours_tps, ref_tps = ours.tokens_per_second(), ref.tokens_per_second()

    def utilisation(run: Run, tps: float) -> str:
        value = mfu(run.flops_per_token, tps, peak)
        return "n/a" if value is None else f"{100 * value:.1f}%"

    memory = "n/a"
    if ours.peak_memory is not None:
        est = estimate_training_memory(config, B, T, precision=args.precision, activation_checkpointing=False)
        memory = f"{format_bytes(ours.peak_memory)} ({format_bytes(est.total)})"
    row = {
        "preset": name,
        "compile": "on" if compile else "off",
        "params smallm / ref": f"{format_count(ours.params)} / {format_count(ref.params)}",
        "ref MLP": f"{hidden}",
        "B x T": f"{B} x {T}",
        "warm-up s smallm / ref": f"{ours.warmup_seconds:.1f} / {ref.warmup_seconds:.1f}",
        "step ms smallm / ref": f"{1e3 * statistics.median(ours.step_seconds):.0f} / "
        f"{1e3 * statistics.median(ref.step_seconds):.0f}",
        "tok/s smallm": f"{ours_tps:,.0f}",
        "tok/s ref": f"{ref_tps:,.0f}",
        "smallm / ref": f"{ours_tps / ref_tps:.2f}x",
        "MFU smallm": utilisation(ours, ours_tps),
        "MFU ref": utilisation(ref, ref_tps),
        "peak mem smallm (estimate)": memory,
    }
    assert list(row) == ROW_HEADERS
    return row


ROW_HEADERS = [
    "preset", "compile", "params smallm / ref", "ref MLP", "B x T", "warm-up s smallm / ref", "step ms smallm / ref",
    "tok/s smallm", "tok/s ref", "smallm / ref", "MFU smallm", "MFU ref", "peak mem smallm (estimate)",
]  # fmt: skip


# ----- report -------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    load = " / ".join(f"{v:.2f}" for v in load_average() or ()) or "n/a"
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{cpu_model()}, {usable_cores()} usable cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}{gpu}; load average {load}"
    )


def markdown_table(rows: list[dict[str, str]]) -> str:
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    parser.add_argument("--presets", help="comma-separated (default: tiny,38m on CPU; 124m,350m on CUDA)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: 4 on CPU, 16 on CUDA)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256 on CPU, 1024 on CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 2 on CPU, 5 on CUDA)")
    parser.add_argument("--precision", choices=list(AMP_DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument(
        "--compile", nargs="?", const="on", choices=list(COMPILE_MODES),
        help="torch.compile both models: off, on (the flag alone) or both, a row each (default: both)",
    )  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="--compile off")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of both models (default: 32000)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads; default: 2)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    defaults = (
        dict(presets="124m,350m", batch_size=16, seq_len=1024, warmup=5, precision="bf16", compile="both")
        if cuda
        else dict(presets="tiny,38m", batch_size=4, seq_len=256, warmup=2, precision="fp32", compile="both")
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = "cuda" if cuda else args.device if args.device != "auto" else "cpu"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as nanoGPT does
    print(f"machine: {machine(device)}")
    print(
        f"settings: {args.precision}, compile {args.compile}, batch {args.batch_size} x "
        f"{args.seq_len}, vocab {args.vocab_size}, {args.warmup} warm-up + {args.steps} timed steps, AdamW"
    )
    if device.type == "cpu":
        dtype = AMP_DTYPES[args.precision] or torch.float32
        print(f"this CPU's measured matmul peak ({dtype}, {args.threads} threads): "
              f"{measured_peak_flops(dtype) / 1e9:.1f} GFLOP/s, the MFU's denominator")  # fmt: skip
    print()
    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    rows = [run_preset(name, args, device, compile) for name in presets for compile in COMPILE_MODES[args.compile]]
    print(markdown_table(rows))
    print()
    print("tok/s from the median step; target smallm / ref >= 1.0x, and MFU >= 50% on an H100 (bf16, compiled).")


if __name__ == "__main__":
    main()
