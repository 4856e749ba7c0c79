"""Quality per token: smallm's training recipes against a nanoGPT-style baseline, side by side in one run.

Every recipe trains the ``tiny`` preset's shape (4 layers, width 256: 3.1M parameters outside the
embedding) on the same token stream: random windows of 256 tokens from the same shards, drawn in the same
order (the loader's rows depend only on the seed and the micro-batch counter, and every recipe takes
micro-batches of 8 rows), up to the same token budget. Each is evaluated on the same held-out windows:
documents of every source kept out of training, about the same number of bytes per source, in bits per
byte (the loss in bits over the UTF-8 bytes of the targets, so tokenizers do not matter).

Recipes:

* ``default``: ``smallm-train`` as a user gets it (its defaults for the preset), through the same parts
  ``smallm.train.jobs`` assembles (a task whose validation is the held-out windows);
* ``previous``: smallm's recipe before Muon: AdamW (lr 3e-3, betas 0.9/0.95, decay 0.1), warm-up 30 then
  cosine to 10%, 8 x 256 tokens per step, GPT-2-style initialisation;
* ``nanogpt``: the GPT-2 block written in ``train_throughput.py`` (learned positions, LayerNorm, GELU MLP
  widened to the same parameter count, tied embeddings), trained here with nanoGPT's baby-GPT settings:
  AdamW lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices, clipping at 1.0, warm-up over 2% of the
  steps then cosine to lr/10, 8 x 256 tokens per step, no dropout;
* variants of ``default`` named on the command line: ``--variant NAME:field=value,...`` with
  :class:`~smallm.train.config.TrainConfig` fields or ``model.<field>`` (e.g. ``muon-wd0:weight_decay=0``).

Reported: each recipe's curves (bits per byte against training tokens, and against seconds of training:
the training steps' wall time, validation left out), its final bits per byte overall and per source, the
tokens and the seconds it needs to reach the baseline's final bits per byte (interpolated between
evaluations; the target is at most 0.33x the baseline's tokens), the gap to the baseline at the end
(target: at least 0.25 below it), and the training steps' seconds and tokens per second (the wall time
includes validation). The plot (``--plot``, default ``quality.png``) has a panel for each axis.

Corpus: ``--source NAME=PATH[:MODE]`` (MODE: file, line or paragraph documents; repeatable); default
the shared corpora (``../shared/data``: Shakespeare by paragraph, the Korean movie reviews by line) and
the Python standard library by file. The tokenizer (8192 ids) and shards are built once into
``--cache`` (default ``~/.cache/smallm/bench-quality``).

    python benches/quality.py                                   # the three recipes, 1.2M tokens each
    python benches/quality.py --tokens 600000 --recipes default,nanogpt --variant adamw:optimizer=adamw

Progress goes to stderr, the markdown report to stdout. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _machine import cpu_model, load_average, usable_cores
from smallm import Tokenizer
from smallm.data.loader import IGNORE_INDEX, TokenLoader, ValidationLoader
from smallm.data.shards import PackOptions, pack_corpus
from smallm.data.shardset import ShardSet
from smallm.inference.evaluate import byte_length_table, evaluate_batches
from smallm.model.config import ModelConfig
from smallm.text.corpus import Corpus, stdlib_sources
from smallm.train.config import TrainConfig, validate
from smallm.train.distributed import setup_runtime
from smallm.train.optim import build_optimizer, cosine_with_warmup
from smallm.train.tasks.lm import Pretraining
from smallm.train.trainable import build_trainable
from smallm.train.trainer import Trainer, seed_everything
from train_throughput import ReferenceGPT, reference_hidden

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, ROWS, VOCAB, SEED = 256, 8, 8192, 1337
PREVIOUS = {
    "optimizer": "adamw", "lr": 3e-3, "schedule": "cosine", "min_lr_ratio": 0.1, "warmup_steps": 30,
    "batch_tokens": ROWS * SEQ_LEN, "init": "gpt2", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
    "model.tie_embeddings": True,
}  # fmt: skip
"""smallm-train's recipe before Muon: what the demo ran for the tiny preset (whose embeddings were tied)."""


# ----- the corpus ---------------------------------------------------------------------------------------


def default_sources() -> list[tuple[str, Path, str]]:
    shared = REPO.parent / "shared" / "data"
    sources = []
    if (shared / "tinyshakespeare.txt").is_file():
        sources.append(("en", shared / "tinyshakespeare.txt", "paragraph"))
    if (shared / "nsmc_reviews_ko.txt").is_file():
        sources.append(("ko", shared / "nsmc_reviews_ko.txt", "line"))
    sources.append(("code", Path(sysconfig.get_paths()["stdlib"]), "file"))
    return sources


def documents(path: Path, mode: str) -> list[str]:
    if path.is_dir():
        files = stdlib_sources() if path == Path(sysconfig.get_paths()["stdlib"]) else sorted(path.rglob("*.txt"))
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    text = path.read_text(encoding="utf-8")
    parts = text.split("\n\n") if mode == "paragraph" else text.split("\n") if mode == "line" else [text]
    return [p for p in (p.strip("\n") for p in parts) if p.strip()]


def prepare(sources: list[tuple[str, Path, str]], cache: Path, val_bytes: int) -> tuple[Path, dict[str, list[str]]]:
    """The shard directory of the training documents (built once) and each source's held-out documents:
    a seeded choice of whole documents adding up to about ``val_bytes``."""
    key = hashlib.sha256(json.dumps([[n, str(p), m] for n, p, m in sources] + [val_bytes, VOCAB]).encode()).hexdigest()
    root = cache / key[:16]
    held_out_file = root / "held_out.json"
    if (root / "data" / "manifest.json").is_file() and held_out_file.is_file():
        return root / "data", json.loads(held_out_file.read_text(encoding="utf-8"))
    root.mkdir(parents=True, exist_ok=True)
    train: list[str] = []
    held_out: dict[str, list[str]] = {}
    for name, path, mode in sources:
        docs = documents(path, mode)
        order = np.random.default_rng(0).permutation(len(docs))
        taken, size = set(), 0
        for i in order.tolist():
            if size >= val_bytes:
                break
            taken.add(i)
            size += len(docs[i].encode("utf-8"))
        held_out[name] = [docs[i] for i in sorted(taken)]
        train += [d for i, d in enumerate(docs) if i not in taken]
        print(f"{name}: {len(docs) - len(taken):,} training documents, {len(taken)} held out ({size:,} bytes)",
              file=sys.stderr)  # fmt: skip
    corpus_file = root / "train.jsonl"
    corpus_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train), encoding="utf-8")
    corpus = Corpus(files=[corpus_file])
    data = root / "data"
    data.mkdir(exist_ok=True)
    tokenizer = Tokenizer.train_from_corpus(corpus, VOCAB, progress=True)
    tokenizer.save(data)
    pack_corpus(corpus, tokenizer, data, PackOptions(val_fraction=0.0), progress=True)
    held_out_file.write_text(json.dumps(held_out, ensure_ascii=False), encoding="utf-8")
    return data, held_out


def held_out_tokens(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """The documents as one stream, each ``<|endoftext|>`` then its text, as the shards hold them."""
    bos = np.array([tokenizer.eot_token], dtype=np.int64)
    encoded = tokenizer.encode_ordinary_batch(docs, return_numpy=True)
    return np.concatenate([part for doc in encoded for part in (bos, doc.astype(np.int64))])


# ----- smallm's recipes -------------------------------------------------------------------------------


class HeldOutPretraining:
    """smallm's pretraining task with the bench's held-out windows as its validation."""

    def __init__(self, cfg: TrainConfig, held_out: list[np.ndarray]) -> None:
        self.inner, self.held_out = Pretraining(cfg), held_out
        self.tokenizer = self.inner.tokenizer

    def attach(self, context: Any) -> Any:
        return self.inner.attach(context)

    def train_batches(self) -> Any:
        return self.inner.train_batches()

    def max_steps(self, rows_per_step: int) -> int:
        return self.inner.max_steps(rows_per_step)

    def validation_batches(self) -> ValidationLoader:
        return ValidationLoader(self.held_out, ROWS, SEQ_LEN, pad_id=self.tokenizer.eot_token, rank=0, world_size=1)

    def sample(self, model: torch.nn.Module) -> str:
        return self.inner.sample(model)

    def run_config(self) -> dict[str, Any]:
        return {}

    def micro_batches_at(self, step: int) -> int | None:
        return self.inner.micro_batches_at(step)

    def stage_ends_at(self, step: int) -> bool:
        return self.inner.stage_ends_at(step)

    def new_rows_at(self, step: int) -> int | None:
        return self.inner.new_rows_at(step)


def smallm_config(data: Path, out: Path, tokens: int, evals: int, overrides: dict[str, Any]) -> TrainConfig:
    """``smallm-train --data DATA`` with its defaults, a budget of ``tokens`` and ``overrides``."""
    values: dict[str, Any] = dict(
        data=str(data), out=str(out), preset="tiny", device="cpu", seed=SEED, batch_size=ROWS, seq_len=SEQ_LEN,
        log_every=10, sample_tokens=1, keep_last=1,
    )  # fmt: skip
    model = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("model.")}
    values.update({k: v for k, v in overrides.items() if not k.startswith("model.")})
    cfg = TrainConfig(**values, model=model)
    steps = max(1, tokens // cfg.step_tokens())
    cfg.max_steps, cfg.eval_every, cfg.checkpoint_every = steps, max(1, steps // evals), steps
    cfg.log_every = math.gcd(cfg.log_every, cfg.eval_every)  # a metrics line at each evaluation: its seconds
    validate(cfg)
    return cfg


def run_smallm(cfg: TrainConfig, held_out: dict[str, np.ndarray]) -> dict[str, Any]:
    runtime = setup_runtime("cpu")
    seed_everything(cfg.seed)
    task = HeldOutPretraining(cfg, list(held_out.values()))
    model = build_trainable(cfg, task.tokenizer, runtime, None)
    trainer = Trainer(cfg, runtime, task, model, build_optimizer)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    step_tokens = cfg.step_tokens()
    curve = [(r["step"] * step_tokens, r["val_bpb"]) for r in records if "val_bpb" in r]
    logged = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    # Each line's tokens/s covers the training steps since the line before (validation left out).
    spent = np.cumsum([(s - s0) * step_tokens / tps for (s0, _), (s, tps) in zip([(0, 0.0), *logged], logged)])
    steps_logged = [s for s, _ in logged]
    time_curve = [(float(np.interp(t / step_tokens, [0, *steps_logged], [0, *spent])), bpb) for t, bpb in curve]
    train_seconds = float(spent[-1])
    byte_lengths = byte_length_table(task.tokenizer, model.config.vocab_size)
    return {
        "curve": curve, "time_curve": time_curve, "seconds": seconds, "train_seconds": train_seconds,
        "steps": trainer.max_steps,
        "step_tokens": step_tokens,
        "per_source": per_source_bpb(model.module, held_out, byte_lengths, task.tokenizer.eot_token),
        "params": model.module.num_parameters(exclude_embeddings=True),
    }  # fmt: skip


def per_source_bpb(
    model: torch.nn.Module, held_out: dict[str, np.ndarray], byte_lengths: torch.Tensor, pad: int
) -> dict:
    return {
        name: evaluate_batches(model, ValidationLoader(tokens, ROWS, SEQ_LEN, pad_id=pad, rank=0, world_size=1),
                               byte_lengths)["bits_per_byte"]
        for name, tokens in held_out.items()
    }  # fmt: skip


# ----- the nanoGPT-style baseline ---------------------------------------------------------------------


class Logits(torch.nn.Module):
    """The reference model seen as ``model(x, y, reduction=...)`` for smallm's evaluation code."""

    def __init__(self, model: ReferenceGPT) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean", **_: Any) -> tuple:
        logits, _ = self.inner(x, y.clamp(min=0))
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss


def run_nanogpt(data: Path, tokens: int, evals: int, held_out: dict[str, np.ndarray]) -> dict[str, Any]:
    tokenizer = Tokenizer.load(data)
    # nanoGPT ties the embedding and lm_head (smallm's tiny preset no longer does: its extra 2.1M
    # parameters are in the table, and the variant default-tied matches the baseline's count).
    config = ModelConfig.preset("tiny", vocab_size=-(-tokenizer.vocab_size // 64) * 64, tie_embeddings=True)
    seed_everything(SEED)
    model = ReferenceGPT(config, reference_hidden(config)).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))  # fmt: skip
    steps = max(1, tokens // (ROWS * SEQ_LEN))
    warmup, every = max(1, round(0.02 * steps)), max(1, steps // evals)
    loader = TokenLoader(ShardSet.open(data, "train"), ROWS, SEQ_LEN, mode="random", seed=SEED, rank=0, world_size=1)
    val = ValidationLoader(list(held_out.values()), ROWS, SEQ_LEN, pad_id=tokenizer.eot_token, rank=0, world_size=1)
    byte_lengths = byte_length_table(tokenizer, config.vocab_size)
    wrapped, curve, time_curve, train_seconds = Logits(model), [], [], 0.0
    start = time.perf_counter()
    for step in range(steps):
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * cosine_with_warmup(step, warmup=warmup, total=steps, min_ratio=0.1)
        x, y = next(loader)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - step_start
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append(((step + 1) * ROWS * SEQ_LEN, evaluate_batches(wrapped, val, byte_lengths)["bits_per_byte"]))
            time_curve.append((train_seconds, curve[-1][1]))
            print(f"nanogpt: step {step + 1}/{steps}, val bpb {curve[-1][1]:.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters()) - model.wte.weight.numel() - model.wpe.weight.numel()
    return {"curve": curve, "time_curve": time_curve, "seconds": seconds, "train_seconds": train_seconds,
            "steps": steps, "step_tokens": ROWS * SEQ_LEN, "params": params,
            "per_source": per_source_bpb(wrapped, held_out, byte_lengths, tokenizer.eot_token)}  # fmt: skip


# ----- the report -------------------------------------------------------------------------------------


def first_reaching(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first x (training tokens or seconds) at which the curve of ``(x, bits per byte)`` reaches
    ``target``, interpolated linearly between evaluations (None when it never does)."""
    previous = (0.0, math.inf)
    for x, bpb in curve:
        if bpb <= target:
            if not math.isfinite(previous[1]):
                return float(x)
            return previous[0] + (x - previous[0]) * (previous[1] - target) / (previous[1] - bpb)
        previous = (x, bpb)
    return None


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, settings = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, settings.split(",")):
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)  # numbers, true/false, null
        except json.JSONDecodeError:
            overrides[key] = raw
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in overrides if k not in fields and not k.startswith("model.")]
    if unknown:
        raise SystemExit(f"--variant {text}: unknown setting(s) {unknown}")
    return name, overrides


def plot(results: dict[str, dict[str, Any]], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120, sharey=True)
    axis = {"curve": (1e6, "training tokens (millions)"), "time_curve": (1.0, "seconds of training (no validation)")}
    for ax, (key, (scale, label)) in zip(axes, axis.items()):
        for name, result in results.items():
            x, bpb = zip(*result[key])
            ax.plot([v / scale for v in x], bpb, "o-" if name == "nanogpt" else "-", label=name, markersize=3)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out bits per byte")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)


def report(results: dict[str, dict[str, Any]], tokens: int) -> str:
    base = results.get("nanogpt")
    target = base["curve"][-1][1] if base else None
    sources = list(next(iter(results.values()))["per_source"])
    head = ["recipe", "params (non-emb.)", "final bpb", *(f"{s} bpb" for s in sources), "vs nanogpt at the end",
            "tokens to nanogpt's final", "seconds to nanogpt's final", "steps x tokens", "train s/step",
            "train tokens/s", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        final = r["curve"][-1][1]
        reach = first_reaching(r["curve"], target) if target is not None else None
        ratio = "n/a" if target is None else "not reached" if reach is None else f"{reach / base['curve'][-1][0]:.2f}x"
        when = first_reaching(r["time_curve"], target) if target is not None else None
        base_s = base["time_curve"][-1][0] if base else 0.0
        seconds = "n/a" if target is None else "not reached" if when is None else f"{when:.0f} ({when / base_s:.2f}x)"
        gap = "n/a" if target is None else f"{final - target:+.3f}"
        cells = [name, f"{r['params'] / 1e6:.2f}M", f"{final:.4f}", *(f"{r['per_source'][s]:.4f}" for s in sources),
                 gap, ratio, seconds, f"{r['steps']} x {r['step_tokens']}", f"{r['train_seconds'] / r['steps']:.3f}",
                 f"{r['steps'] * r['step_tokens'] / r['train_seconds']:,.0f}", f"{r['seconds']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    curves = ["", "curves (tokens: bits per byte):"]
    for name, r in results.items():
        curves.append(f"- {name}: " + ", ".join(f"{t / 1e3:.0f}k {b:.3f}" for t, b in r["curve"]))
    curves += ["", "curves (seconds of training: bits per byte):"]
    for name, r in results.items():
        curves.append(f"- {name}: " + ", ".join(f"{s:.0f}s {b:.3f}" for s, b in r["time_curve"]))
    return "\n".join([*lines, *curves])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_200_000, help="training tokens per recipe (default: 1.2M)")
    p.add_argument("--evals", type=int, default=12, help="evaluations along each run (default: 12)")
    p.add_argument("--recipes", default="default,previous,nanogpt", help="comma-separated, of default,previous,nanogpt")
    p.add_argument("--variant", action="append", default=[], help="NAME:field=value,... : a variant of default")
    p.add_argument("--source", action="append", default=[], help="NAME=PATH[:MODE] (MODE: file, line, paragraph)")
    p.add_argument("--val-bytes", type=int, default=48_000, help="held-out bytes per source (default: 48000)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "smallm" / "bench-quality")
    p.add_argument("--out", type=Path, default=Path("/tmp/smallm-quality"), help="run directories")
    p.add_argument("--plot", type=Path, default=Path("quality.png"))
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=usable_cores())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sources = default_sources()
    if args.source:
        sources = []
        for item in args.source:
            name, _, rest = item.partition("=")
            path, _, mode = rest.partition(":")
            sources.append((name, Path(path), mode or "file"))
    data, held_out_docs = prepare(sources, args.cache, args.val_bytes)
    tokenizer = Tokenizer.load(data)
    held_out = {name: held_out_tokens(tokenizer, docs) for name, docs in held_out_docs.items()}
    recipes: dict[str, dict[str, Any] | None] = {}
    for name in filter(None, args.recipes.split(",")):
        recipes[name] = None if name == "nanogpt" else {} if name == "default" else dict(PREVIOUS)
    for text in args.variant:
        name, overrides = parse_variant(text)
        recipes[name] = overrides
    print(f"machine: {cpu_model()}, {usable_cores()} usable cores, torch {torch.__version__} ({args.threads} threads), "
          f"Python {platform.python_version()}; load average {load_average()}", file=sys.stderr)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    for name, overrides in recipes.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        if overrides is None:
            results[name] = run_nanogpt(data, args.tokens, args.evals, held_out)
        else:
            cfg = smallm_config(data, args.out / name, args.tokens, args.evals, overrides)
            shutil.rmtree(cfg.out, ignore_errors=True)
            results[name] = run_smallm(cfg, held_out)
        print(f"{name}: final bpb {results[name]['curve'][-1][1]:.4f}", file=sys.stderr, flush=True)
    machine = (
        f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; load average at the end {load_average()}"
    )
    text = f"{args.tokens:,} training tokens per recipe; {machine}\n\n" + report(results, args.tokens)
    print(text)
    plot(results, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
