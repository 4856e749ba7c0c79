"""Benchmark the training data loader (:mod:`smallm.data.loader`) on a synthetic shard directory.

Builds a shard directory in a temporary folder with numpy: ``--tokens`` tokens (default 20M) of
documents whose lengths are lognormal (median 300 tokens, sigma 1.0, so a mean of about 495 and a long
tail like web text), random ids below 31997 after a BOS of 31997, in shards of 5M tokens, plus a small
val split. ``tokenizer.json`` is a placeholder: the loader only checks its sha256 against the manifest.

Then measures, on the CPU, in one process:

* opening the shards (with and without ``verify``, which reads every token once);
* microseconds per training batch (B=16, T=1024) in ``"random"`` and ``"documents"`` mode: mean, p50
  and p99 over ``--batches`` batches after ``--warmup``; the target is 1 ms, about 1% of a 124M-model
  GPU step;
* microseconds per validation batch;
* the cropped fraction of ``"documents"`` mode over one full epoch at T=1024 and T=2048 for several
  buffer sizes, beside nanochat's best-fit rule simulated on the same lengths (the anchor: documents
  longer than a row wait in the buffer and get cropped at row ends) and the floor that any packing
  keeping documents aligned to rows must drop (the part of every document beyond T+1 tokens).

Run from the repository root with smallm installed::

    python benches/loader_bench.py                 # about a minute
    python benches/loader_bench.py --tokens 5e6    # quicker

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_model, load_average, usable_cores
from smallm.data.loader import TokenLoader, ValidationLoader
from smallm.data.shardset import ShardSet

VOCAB_SIZE, BOS_ID = 32000, 31997
MEDIAN_LENGTH, SIGMA = 300, 1.0
SHARD_TOKENS = 5_000_000


def document_lengths(total: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal lengths (at least 2 tokens) adding up to at least ``total``."""
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < total:
        draw = rng.lognormal(np.log(MEDIAN_LENGTH), SIGMA, size=total // MEDIAN_LENGTH)
        lengths = np.concatenate([lengths, np.maximum(draw.round().astype(np.int64), 2)])
    return lengths[: np.searchsorted(np.cumsum(lengths), total) + 1]


def write_split(directory: Path, split: str, lengths: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Writes documents as shards of about SHARD_TOKENS tokens; returns their manifest entries."""
    entries, first = [], 0
    ends = np.cumsum(lengths)
    while first < len(lengths):
        last = max(int(np.searchsorted(ends, (ends[first - 1] if first else 0) + SHARD_TOKENS)), first + 1)
        shard_lengths = lengths[first:last]
        starts = np.concatenate([[0], np.cumsum(shard_lengths)[:-1]]).astype("<i8")
        n = int(shard_lengths.sum())
        tokens = rng.integers(0, BOS_ID, size=n, dtype=np.uint16)
        tokens[starts] = BOS_ID
        name = f"{split}_{len(entries):06d}"
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, n)
        with open(directory / f"{name}.bin", "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        index_header = np.array([20240521, 1, len(starts), n], dtype="<i8")
        (directory / f"{name}.idx").write_bytes(index_header.tobytes() + starts.tobytes())
        entries.append({"file": f"{name}.bin", "index": f"{name}.idx", "tokens": n, "documents": len(starts)})
        first = last
    return entries


def build_shard_dir(directory: Path, total: int, seed: int = 0) -> np.ndarray:
    """Writes the synthetic shard directory; returns the train document lengths."""
    rng = np.random.default_rng(seed)
    lengths = document_lengths(total, rng)
    n_val = max(len(lengths) // 200, 1)
    tokenizer = b'{"note": "placeholder: smallm.data.loader checks only this file\'s sha256"}\n'
    (directory / "tokenizer.json").write_bytes(tokenizer)
    splits = {"train": write_split(directory, "train", lengths[n_val:], rng)}
    splits["val"] = write_split(directory, "val", lengths[:n_val], rng)
    manifest = {
        "format": "smallm-shards",
        "format_version": 1,
        "tokenizer": {"file": "tokenizer.json", "sha256": hashlib.sha256(tokenizer).hexdigest()},
        "vocab_size": VOCAB_SIZE,
        "dtype": "uint16",
        "bos_id": BOS_ID,
        "special_tokens": {"<|endoftext|>": BOS_ID},
        "shard_tokens": SHARD_TOKENS,
        "splits": splits,
        "sources": [],
        "options": {"synthetic": f"lognormal median {MEDIAN_LENGTH} sigma {SIGMA}"},
        "totals": {},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return lengths[n_val:]


def time_batches(batches: object, count: int, warmup: int) -> np.ndarray:
    """Microseconds for each of ``count`` ``next()`` calls after ``warmup`` untimed ones."""
    it = iter(batches)  # type: ignore[call-overload]
    for _ in range(warmup):
        next(it)
    times = np.empty(count)
    for i in range(count):
        start = time.perf_counter_ns()
        next(it)
        times[i] = (time.perf_counter_ns() - start) / 1000
    return times


def cropped_over_an_epoch(shards: ShardSet, seq_len: int, buffer_size: int) -> tuple[float, float]:
    """Cropped fraction after one full epoch of B=16 batches, and the seconds it took."""
    loader = TokenLoader(shards, 16, seq_len, mode="documents", buffer_size=buffer_size)
    start = time.perf_counter()
    while loader.epoch == 0:
        next(loader)
    return loader.cropped_fraction, time.perf_counter() - start


def nanochat_cropped(lengths: np.ndarray, row_len: int, buffer_size: int) -> float:
    """The cropped fraction of nanochat's best fit, simulated on lengths alone (the anchor).

    Every document waits in one buffer; a row takes the largest that fits the room left and, when none
    fits, the shortest is cropped to fill the row. The buffer is refilled after every pick and drained at
    the end, like smallm's epochs.
    """
    buffer: list[tuple[int, int]] = []
    consumed = cropped = filled = position = 0
    while True:
        while len(buffer) < buffer_size and position < len(lengths):
            bisect.insort(buffer, (int(lengths[position]), position))
            position += 1
        if not buffer:
            return cropped / consumed
        room = row_len - filled
        best = bisect.bisect_right(buffer, (room, len(lengths))) - 1
        length, _ = buffer.pop(max(best, 0))
        take = min(length, room)
        consumed, cropped, filled = consumed + length, cropped + length - take, (filled + take) % row_len


def machine() -> str:
    load = " / ".join(f"{v:.2f}" for v in load_average() or ()) or "n/a"
    return (
        f"{cpu_model()}, {usable_cores()} usable cores, {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, default=20e6, help="train + val tokens to synthesize")
    parser.add_argument("--batches", type=int, default=500, help="timed batches per mode")
    parser.add_argument("--warmup", type=int, default=50, help="untimed batches first")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="smallm-loader-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        lengths = build_shard_dir(directory, int(args.tokens))
        built = time.perf_counter() - start
        print(
            f"built {lengths.sum() / 1e6:.1f}M train tokens, {len(lengths)} documents in {built:.1f} s",
            file=sys.stderr,
        )
        start = time.perf_counter()
        shards = ShardSet.open(directory)
        open_verified = time.perf_counter() - start
        start = time.perf_counter()
        ShardSet.open(directory, verify=False)
        open_plain = time.perf_counter() - start

        B, T = 16, 1024
        rows = []
        for mode in ("random", "documents"):
            print(f"timing {mode} mode", file=sys.stderr)
            loader = TokenLoader(shards, B, T, mode=mode)
            rows.append((f"train, `{mode}`", time_batches(loader, args.batches, args.warmup)))
        val = ValidationLoader(ShardSet.open(directory, "val"), B, T)
        rows.append(("validation", time_batches(_repeat(val), args.batches, args.warmup)))

        print("measuring the cropped fraction over an epoch", file=sys.stderr)
        crops = []
        shuffled = np.random.default_rng(1).permutation(lengths)
        for seq_len in (1024, 2048):
            floor = np.maximum(lengths - (seq_len + 1), 0).sum() / lengths.sum()
            for buffer_size in (256, 1024, 4096):
                fraction, seconds = cropped_over_an_epoch(shards, seq_len, buffer_size)
                anchor = nanochat_cropped(shuffled, seq_len + 1, buffer_size)
                crops.append((seq_len, buffer_size, fraction, anchor, floor, seconds))

    print("## smallm.data.loader loader benchmark\n")
    print(f"Machine: {machine()}.\n")
    print(
        f"Data: {lengths.sum() / 1e6:.1f}M train tokens in {len(shards.shards)} shards, {len(lengths)} "
        f"documents, lognormal lengths (median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
        f"p99 {np.percentile(lengths, 99):.0f} tokens). Built in {built:.1f} s; `ShardSet.open` "
        f"{open_verified * 1000:.0f} ms with `verify`, {open_plain * 1000:.1f} ms without.\n"
    )
    print(f"Per batch, B={B}, T={T}, CPU, {args.batches} batches after {args.warmup} warmup:\n")
    print("| loader | mean µs | p50 µs | p99 µs | tokens/s (M) |")
    print("|---|---:|---:|---:|---:|")
    for name, times in rows:
        mean = times.mean()
        print(
            f"| {name} | {mean:.0f} | {np.percentile(times, 50):.0f} | {np.percentile(times, 99):.0f} | "
            f"{B * T / mean:.0f} |"
        )
    print(
        "\n`documents` mode, cropped fraction over one epoch (dropped / consumed tokens), beside nanochat's "
        "rule simulated on the same lengths and the floor (the tokens of every document beyond T+1):\n"
    )
    print("| T | buffer | smallm | nanochat's rule | floor | smallm epoch s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for seq_len, buffer_size, fraction, anchor, floor, seconds in crops:
        print(f"| {seq_len} | {buffer_size} | {fraction:.1%} | {anchor:.1%} | {floor:.1%} | {seconds:.1f} |")


def _repeat(loader: ValidationLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation batches, over and over."""
    while True:
        yield from loader


if __name__ == "__main__":
    main()
