"""Tokens per second of smallm's training step beside nanochat's, from nanochat's own source, in one run.

nanochat (Karpathy's ``nanochat``: ``nanochat/gpt.py``'s GPT and ``nanochat/optim.py``'s MuonAdamW) is
not a dependency and none of it is copied here: the bench imports it from a checkout named by
``--nanochat-dir`` and builds its model and optimizer as its ``scripts/base_train.py`` does (on the meta
device, ``to_empty``, ``init_weights``, ``setup_optimizer()`` with its default rates), at smallm's ``tiny``
shape: 4 layers, width 256, 4 query and 2 key/value heads, full causal attention in every layer
(``window_pattern="L"``, as its ``runs/runcpu.sh`` trains on a CPU), vocabulary 8192, 8 rows of 256
tokens. Both steps take the same random batch on the same device at the same precision:

* smallm's: ``SmallLM`` of the preset with the optimizer ``smallm-train`` resolves for it
  (:func:`smallm.train.optim.build_optimizer`: BatchedMuon on the block matrices, AdamW on the rest) and
  its schedule, stepped as :class:`smallm.train.trainer.Trainer` steps (autocast, the summed loss scaled
  by the token count, backward, gradient clipping and its finiteness check, the optimizer, ``zero_grad``,
  the schedule);
* nanochat's: ``loss = model(x, y)``, backward, each group's rate, Muon's momentum and decay set,
  ``optimizer.step()``, ``model.zero_grad(set_to_none=True)`` and ``loss.item()``, as base_train.py's
  loop does. Its precision is its own ``NANOCHAT_DTYPE`` (fp32 master weights, the matmuls cast to the
  compute dtype; the embeddings stored in it), set here from ``--precision``.

``--compile both`` (the default) measures each with its model eager and with ``torch.compile`` (smallm's
as ``--compile`` does, nanochat's with ``dynamic=False`` as base_train.py does). nanochat's optimizer
kernels (``adamw_step_fused``, ``muon_step_fused``) are compiled by its own decorators in both rows, so
its first step compiles them (about a minute and a half on a 2-core CPU); on a CPU that needs a C++
compiler, which inductor finds as torch documents. A step that fails to build or run gives a row that
says why. The models differ beyond the shape (nanochat's 4x ReLU^2 MLP, value embeddings, smear, logit
soft-capping...), so each row gives its model's own FLOPs per token (6 x matmul weights + the attention
term, counted alike by both projects) and MFU beside the tokens per second.

Get nanochat (any commit since its ``MuonAdamW``; the report names the one it ran)::

    git clone https://github.com/karpathy/nanochat /tmp/nanochat     # needs torch and filelock to import
    python benches/nanochat_step.py --nanochat-dir /tmp/nanochat                 # CPU: fp32, 2 threads
    python benches/nanochat_step.py --nanochat-dir /tmp/nanochat --precision bf16 --compile on

A bare git directory (a mirror) is accepted too: its HEAD is extracted to a temporary folder. Without
``--nanochat-dir`` (or ``$NANOCHAT_DIR``) only smallm's rows are measured, and the report says so.
Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.train.config import TrainConfig
from smallm.train.distributed import autocast_dtype
from smallm.train.memory import flops_per_token, format_count, measured_peak_flops, mfu, peak_flops
from smallm.train.optim import build_optimizer, build_schedule
from smallm.train.resolve import resolve_optimization
from torch import Tensor
from train_throughput import COMPILE_MODES, machine, markdown_table, sync

PRESET = "tiny"
NANOCHAT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""``--precision`` as nanochat's ``NANOCHAT_DTYPE`` names it."""


class SmallmStep:
    """smallm's model, optimizer and schedule, stepping on one batch as the trainer steps."""

    name = "smallm"

    def __init__(self, config: ModelConfig, ids: Tensor, targets: Tensor, precision: str, compile: bool) -> None:
        device = ids.device
        cfg = TrainConfig(preset=PRESET, batch_size=ids.size(0), seq_len=ids.size(1), precision=precision)
        self.cfg = resolve_optimization(cfg, config, device)
        torch.manual_seed(0)
        self.model = SmallLM(config).to(device).train()
        self.optimizer = build_optimizer(self.model, self.cfg, device, total_steps=100_000)
        self.scheduler = build_schedule(self.optimizer, self.cfg, 100_000)
        self.net = torch.compile(self.model) if compile else self.model
        self.amp = autocast_dtype(precision, device)
        self.ids, self.targets, self.scale = ids, targets, 1.0 / targets.numel()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = flops_per_token(config, ids.size(1))

    def step(self) -> None:
        with torch.autocast(self.ids.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            _, loss = self.net(self.ids, self.targets, reduction="sum")
        (loss * self.scale).backward()
        trainable = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(trainable, self.cfg.grad_clip or math.inf)
        if not torch.isfinite(norm):
            raise RuntimeError(f"smallm's gradient norm became {norm.item()}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class NanochatStep:
    """nanochat's GPT and MuonAdamW from its source, stepping on one batch as its base_train.py steps."""

    name = "nanochat"

    def __init__(self, gpt: ModuleType, config: ModelConfig, ids: Tensor, targets: Tensor, compile: bool) -> None:
        shape = gpt.GPTConfig(
            sequence_len=ids.size(1), vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head,
            n_kv_head=config.n_kv_head, n_embd=config.n_embd, window_pattern="L",
        )  # fmt: skip
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines are not the report
            with torch.device("meta"):
                model = gpt.GPT(shape)
            model.to_empty(device=ids.device)
            torch.manual_seed(0)
            model.init_weights()
            self.optimizer = model.setup_optimizer()
        self.model = model.train()
        self.net = torch.compile(model, dynamic=False) if compile else model
        self.ids, self.targets = ids, targets
        self.params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = model.estimate_flops()

    def step(self) -> None:
        loss = self.net(self.ids, self.targets)
        loss.backward()
        for group in self.optimizer.param_groups:  # base_train.py sets these every step
            group["lr"] = group["initial_lr"]
            if group["kind"] == "muon":  # its momentum after the warm-up; the decay stays at setup's
                group["momentum"] = 0.95
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        loss.item()


# ----- nanochat's source -----------------------------------------------------------------------------


def nanochat_source(directory: Path) -> tuple[Path, str]:
    """The folder to import nanochat from and the commit it is: ``directory`` itself (a checkout), or a
    bare git directory's HEAD extracted to a temporary folder."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True)
    revision = commit.stdout.strip()[:12] if commit.returncode == 0 else "unknown commit (no git metadata)"
    if (directory / "nanochat" / "gpt.py").is_file():
        return directory, revision
    if commit.returncode != 0:
        raise FileNotFoundError(f"{directory} holds neither nanochat/gpt.py nor a git repository of nanochat")
    target = Path(tempfile.mkdtemp(prefix="nanochat-"))
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=directory, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target, revision


def import_nanochat(directory: Path, precision: str) -> ModuleType:
    """nanochat's ``nanochat.gpt`` module from ``directory``, its compute dtype set to ``precision``."""
    os.environ["NANOCHAT_DTYPE"] = NANOCHAT_DTYPES[precision]  # read once, when nanochat.common is imported
    sys.path.insert(0, str(directory))
    with contextlib.redirect_stdout(sys.stderr):
        gpt = importlib.import_module("nanochat.gpt")
    return gpt


# ----- timing and the report -------------------------------------------------------------------------


def timed(step: Any, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def measure(
    builders: dict[str, Any], args: argparse.Namespace, device: torch.device, compile: bool, peak: float | None
) -> list[dict[str, str]]:
    """One row per step: each built and warmed up in turn, then their timed steps alternated, so that a
    change in the machine's load falls on all alike. A step that cannot be built or run gets a row that
    says why."""
    mode = "on" if compile else "off"
    started: dict[str, tuple[Any, float]] = {}
    rows: dict[str, dict[str, str]] = {}
    for name, build in builders.items():
        print(f"{name} (compile {mode}): building and {args.warmup} warm-up steps", file=sys.stderr, flush=True)
        try:
            stepper = build(compile)
            warmup = sum(timed(stepper.step, device) for _ in range(args.warmup))
            started[name] = (stepper, warmup)
        except Exception as e:  # torch.compile and a foreign codebase raise many types
            reason = (str(e).strip().splitlines() or [""])[0][:160].replace("|", "/")
            print(f"{name} (compile {mode}) failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows[name] = {"step": name, "compile": mode, "tok/s": f"failed: {type(e).__name__}: {reason}"}
    seconds: dict[str, list[float]] = {name: [] for name in started}
    print(f"timing {args.steps} steps each, alternating (compile {mode})", file=sys.stderr, flush=True)
    for _ in range(args.steps):
        for name, (stepper, _) in started.items():
            seconds[name].append(timed(stepper.step, device))
    tokens = args.batch_size * args.seq_len
    for name, (stepper, warmup) in started.items():
        tps = tokens / statistics.median(seconds[name])
        value = mfu(stepper.flops_per_token, tps, peak)
        rows[name] = {
            "step": name, "compile": mode, "params": format_count(stepper.params),
            "FLOPs/token": format_count(stepper.flops_per_token), "warm-up s": f"{warmup:.1f}",
            "step ms": f"{1e3 * statistics.median(seconds[name]):.0f}", "tok/s": f"{tps:,.0f}",
            "MFU": "n/a" if value is None else f"{100 * value:.1f}%",
        }  # fmt: skip
    if "smallm" in started and "nanochat" in started:
        ratio = statistics.median(seconds["nanochat"]) / statistics.median(seconds["smallm"])
        rows["smallm"]["smallm / nanochat"] = f"{ratio:.2f}x"
    ordered = sorted(rows.items(), key=lambda item: item[0] != "smallm")
    return [{h: row.get(h, "") for h in HEADERS} for _, row in ordered]


HEADERS = ["step", "compile", "params", "FLOPs/token", "warm-up s", "step ms", "tok/s", "smallm / nanochat", "MFU"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanochat-dir", type=Path, default=os.environ.get("NANOCHAT_DIR"),
                        help="a checkout of github.com/karpathy/nanochat, or a bare git directory of it")  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda if available)")
    parser.add_argument("--precision", choices=list(NANOCHAT_DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--compile", default="both", choices=list(COMPILE_MODES), help="default: both, a row each")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (default: 256)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="both models' vocabulary (default: 8192)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps each (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3; compiles here)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads; default: 2)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu" if args.device == "auto" else args.device
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measured_peak_flops(dtype) if device.type == "cpu" else peak_flops(device, dtype)
    config = ModelConfig.preset(PRESET, vocab_size=args.vocab_size, max_seq_len=max(args.seq_len, 256))
    generator = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, args.vocab_size, (2, args.batch_size, args.seq_len), generator=generator).to(device)
    builders: dict[str, Any] = {"smallm": lambda c: SmallmStep(config, ids, targets, args.precision, c)}
    source = "not measured: no --nanochat-dir given (see this bench's docstring for how to get nanochat)"
    if args.nanochat_dir is not None:
        try:
            folder, revision = nanochat_source(Path(args.nanochat_dir))
            gpt = import_nanochat(folder, args.precision)
            builders["nanochat"] = lambda c: NanochatStep(gpt, config, ids, targets, c)
            source = f"{args.nanochat_dir} at {revision}, compute dtype {gpt.COMPUTE_DTYPE}"
        except Exception as e:  # a missing folder, a missing dependency of nanochat's...
            source = f"not measured: {args.nanochat_dir} did not import ({type(e).__name__}: {e})"
    print(f"machine: {machine(device)}")
    print(f"nanochat: {source}")
    print(f"shape: {PRESET} ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
          f"{config.n_kv_head} KV heads), vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len}, "
          f"{args.precision}; {args.warmup} warm-up + {args.steps} timed steps each")  # fmt: skip
    where = "this CPU's measured matmul peak" if device.type == "cpu" else "the GPU's datasheet peak"
    print(f"MFU against {where}: " + ("n/a" if peak is None else f"{peak / 1e9:,.1f} GFLOP/s"))
    print()
    rows = [row for compile in COMPILE_MODES[args.compile] for row in measure(builders, args, device, compile, peak)]
    print(markdown_table(rows))
    print()
    print("tok/s from the median step; smallm / nanochat: the ratio of their tok/s, timed in the same rounds.")


if __name__ == "__main__":
    main()
