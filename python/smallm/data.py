"""Training data loader: memory-mapped token shards to ``(x, y)`` batches for next-token prediction.

Reads the shard directory that the packer writes (``smallm-shards`` format version 1):

* ``manifest.json``: the tokenizer file and its sha256, ``vocab_size``, the token ``dtype``, the BOS
  (``<|endoftext|>``) id and, per split, the shards with their token and document counts.
* ``<split>_NNNNNN.bin``: the llm.c / modded-nanogpt token file: a header of 256 little-endian int32
  (magic 20240520; version 1 = uint16 tokens, 2 = uint32 tokens; token count n), then n tokens.
* ``<split>_NNNNNN.idx``: a header of 4 little-endian int64 (magic 20240521, version 1, documents d,
  tokens n), then d strictly increasing document start offsets, the first 0. Every document starts
  with the BOS id and ends where the next one starts; documents never span shards.

:class:`ShardSet` checks all of this and maps every shard with ``np.memmap`` (copy-on-write, so torch
accepts it; nothing is ever written): its tensors are views of the files, never copies.

:class:`TokenLoader` yields training batches, ``x`` and ``y = x`` shifted by one, both ``(B, T)`` int64:

* ``"random"``: windows of T+1 tokens at uniformly random starts over all shards (nanoGPT). Batch k is
  drawn from ``np.random.default_rng([seed, rank, k])``, so the whole position is the batch counter.
* ``"documents"``: every row starts at a document's BOS and holds whole documents, chosen by best fit
  (nanochat's BOS-aligned loader) from a buffer of the next ``buffer_size`` (default 1024) documents of
  a seeded per-epoch permutation: the largest document that fits the rest of the row goes in; when none
  fits, the shortest one in the buffer is cropped to fill the row exactly and its tail is dropped.
  ``cropped_fraction`` is dropped tokens / tokens of the documents taken. ``benches/loader_bench.py``
  measures 28.8% at T=1024 and 21.1% at T=2048 for lognormal document lengths (median 300 tokens,
  sigma 1); a bigger buffer barely helps, since what is lost is mostly the tails of documents longer
  than a row. An epoch uses each document exactly once: the buffer drains before the next epoch's
  permutation starts (a row may straddle the two).

Distributed training: rank r of w gets a disjoint part. In ``"documents"`` mode the documents at
positions i % w == r of each epoch's permutation; in ``"random"`` mode the r-th of w contiguous parts
of every shard. ``state_dict`` / ``load_state_dict`` resume exactly where a loader stopped.

:class:`ValidationLoader` makes every token of a split (except each shard's first) a target exactly
once: rows of T+1 tokens with stride T, the last row of a shard padded (x with BOS, y with -100).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "Shard", "ShardError", "ShardSet", "TokenLoader", "ValidationLoader"]

PathLike = Union[str, "os.PathLike[str]"]
Mode = Literal["random", "documents"]

FORMAT, FORMAT_VERSION = "smallm-shards", 1
TOKENS_MAGIC, INDEX_MAGIC, INDEX_VERSION = 20240520, 20240521, 1
TOKENS_HEADER_BYTES, INDEX_HEADER_BYTES = 256 * 4, 4 * 8
TOKEN_VERSIONS = {"uint16": 1, "uint32": 2}  # manifest dtype -> .bin header version
TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
IGNORE_INDEX = -100
"""The target of padding in validation batches (``torch.nn.functional.cross_entropy``'s default)."""


class ShardError(ValueError):
    """A shard directory that does not follow the format; the message names the file at fault."""


# ----- the shard directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One token file and its document index, both memory-mapped."""

    path: Path
    """The ``.bin`` token file."""
    index_path: Path
    """The ``.idx`` document index."""
    array: np.ndarray
    """The tokens (uint16 or uint32), a copy-on-write map of ``path``."""
    tokens: torch.Tensor
    """``array`` as a 1-D torch tensor: the same memory, not a copy."""
    doc_starts: np.ndarray
    """Document start offsets (int64), a map of ``index_path``."""

    @property
    def num_tokens(self) -> int:
        return len(self.array)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)


class ShardSet:
    """The checked, memory-mapped shards of one split of a shard directory; make it with :meth:`open`."""

    def __init__(self, directory: Path, split: str, manifest: dict[str, Any], shards: list[Shard]) -> None:
        self.directory = directory
        self.split = split
        self.manifest = manifest
        self.shards = shards
        self.vocab_size: int = manifest["vocab_size"]
        self.bos_id: int = manifest["bos_id"]

    @classmethod
    def open(cls, directory: PathLike, split: str = "train", *, verify: bool = True) -> ShardSet:
        """Reads ``directory/manifest.json`` and maps the shards of ``split``.

        Always checks the manifest, the tokenizer's sha256, and every header, file size and count
        against each other and the manifest. ``verify`` also reads every token once: ids below
        ``vocab_size`` and a BOS at every document start. Raises :class:`ShardError` naming the file.
        """
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        manifest = _read_manifest(manifest_path)
        _check_tokenizer(directory, manifest_path, manifest["tokenizer"])
        if split not in manifest["splits"]:
            raise ShardError(f"{manifest_path}: no split {split!r} (it has {sorted(manifest['splits'])})")
        version = TOKEN_VERSIONS[manifest["dtype"]]
        shards = []
        for i, entry in enumerate(manifest["splits"][split]):
            try:
                file, index, tokens, documents = (entry[k] for k in ("file", "index", "tokens", "documents"))
            except (KeyError, TypeError) as e:
                raise ShardError(f"{manifest_path}: {split} shard {i} lacks {e}") from e
            shard = _open_shard(directory / file, directory / index, version, tokens, documents)
            if verify:
                _verify_tokens(shard, manifest["vocab_size"], manifest["bos_id"])
            shards.append(shard)
        return cls(directory, split, manifest, shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.directory)!r}, split={self.split!r}, shards={len(self.shards)}, "
            f"tokens={self.num_tokens}, documents={self.num_documents})"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ShardError(f"{path}: missing (not a shard directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: expected a JSON object")
    found = (manifest.get("format"), manifest.get("format_version"))
    if found != (FORMAT, FORMAT_VERSION):
        raise ShardError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, found {found}")
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "bos_id", "splits") if k not in manifest]
    if missing:
        raise ShardError(f"{path}: missing fields {missing}")
    if manifest["dtype"] not in TOKEN_VERSIONS:
        raise ShardError(f"{path}: dtype {manifest['dtype']!r} is not one of {sorted(TOKEN_VERSIONS)}")
    return manifest


def _check_tokenizer(directory: Path, manifest_path: Path, entry: dict[str, str]) -> None:
    path = directory / entry["file"]
    if not path.is_file():
        raise ShardError(f"{path}: missing (the tokenizer named in {manifest_path})")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"].lower():
        raise ShardError(
            f"{path}: sha256 {digest} does not match {entry['sha256']} in {manifest_path}: "
            "the shards were made with another tokenizer"
        )


def _read_header(path: Path, size: int, dtype: str) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"{path}: missing (listed in manifest.json)")
    found = path.stat().st_size
    if found < size:
        raise ShardError(f"{path}: {found} bytes, shorter than its {size}-byte header")
    return np.fromfile(path, dtype=dtype, count=size // np.dtype(dtype).itemsize)


def _check_size(path: Path, expected: int, what: str) -> None:
    found = path.stat().st_size
    if found != expected:
        raise ShardError(f"{path}: file size {found} bytes, but {what} make {expected} bytes")


def _map(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(count,))


def _open_shard(path: Path, index_path: Path, version: int, tokens: int, documents: int) -> Shard:
    magic, found_version, n = (int(v) for v in _read_header(path, TOKENS_HEADER_BYTES, "<i4")[:3])
    if magic != TOKENS_MAGIC:
        raise ShardError(f"{path}: bad magic: expected {TOKENS_MAGIC}, found {magic}")
    if found_version != version:
        raise ShardError(f"{path}: bad version: expected {version} (manifest.json), found {found_version}")
    dtype = TOKEN_DTYPES[version]
    _check_size(path, TOKENS_HEADER_BYTES + n * dtype.itemsize, f"the header's {n} tokens")
    if n != tokens:
        raise ShardError(f"{path}: header says {n} tokens, manifest.json says {tokens}")

    magic, found_version, d, index_n = (int(v) for v in _read_header(index_path, INDEX_HEADER_BYTES, "<i8"))
    if magic != INDEX_MAGIC:
        raise ShardError(f"{index_path}: bad magic: expected {INDEX_MAGIC}, found {magic}")
    if found_version != INDEX_VERSION:
        raise ShardError(f"{index_path}: bad version: expected {INDEX_VERSION}, found {found_version}")
    if index_n != n:
        raise ShardError(f"{index_path}: header says {index_n} tokens, {path.name} has {n}")
    if d != documents:
        raise ShardError(f"{index_path}: header says {d} documents, manifest.json says {documents}")
    _check_size(index_path, INDEX_HEADER_BYTES + 8 * d, f"the header's {d} documents")
    starts = _map(index_path, np.dtype("<i8"), INDEX_HEADER_BYTES, d)
    if d == 0 and n > 0:
        raise ShardError(f"{index_path}: no documents, but {path.name} has {n} tokens")
    if d > 0:
        if starts[0] != 0:
            raise ShardError(f"{index_path}: the first document starts at {starts[0]}, not 0")
        steps = np.diff(starts)
        if len(steps) and steps.min() <= 0:
            i = int(np.argmax(steps <= 0))
            raise ShardError(
                f"{index_path}: offsets not strictly increasing: document {i} at {starts[i]}, "
                f"document {i + 1} at {starts[i + 1]}"
            )
        if starts[-1] >= n:
            raise ShardError(f"{index_path}: the last document starts at {starts[-1]}, past {n} tokens")
    array = _map(path, dtype, TOKENS_HEADER_BYTES, n)
    return Shard(path, index_path, array, torch.from_numpy(array), starts)


def _verify_tokens(shard: Shard, vocab_size: int, bos_id: int) -> None:
    if shard.num_tokens == 0:
        return
    top = int(shard.array.max())
    if top >= vocab_size:
        at = int(np.argmax(shard.array >= vocab_size))
        raise ShardError(
            f"{shard.path}: token id {top} >= vocab_size {vocab_size} (first out-of-range id at token {at})"
        )
    firsts = shard.array[shard.doc_starts]
    if not np.all(firsts == bos_id):
        i = int(np.argmax(firsts != bos_id))
        raise ShardError(
            f"{shard.index_path}: document {i} starts at token {shard.doc_starts[i]} of {shard.path.name}, "
            f"whose id {firsts[i]} is not the BOS id {bos_id}"
        )


# ----- samplers: fill the rows of one batch, (B, T+1) int64, and say where they are ----------------


class _RandomWindows:
    """Uniform random windows inside this rank's part of each shard; stateless but for a counter."""

    def __init__(self, shards: ShardSet, row_len: int, seed: int, rank: int, world_size: int) -> None:
        self.row_len, self.seed, self.rank = row_len, seed, rank
        self.arrays, lows, counts = [], [], []
        for shard in shards.shards:
            lo = shard.num_tokens * rank // world_size
            hi = shard.num_tokens * (rank + 1) // world_size
            if hi - lo >= row_len:
                self.arrays.append(shard.array)
                lows.append(lo)
                counts.append(hi - lo - row_len + 1)  # window starts lo ..= hi - row_len
        if not counts:
            raise ValueError(
                f"no shard of {shards.directory} ({shards.split}) has {row_len} tokens in rank {rank}'s "
                f"part of {world_size}: lower seq_len or world_size"
            )
        self.lows = np.array(lows, dtype=np.int64)
        self.ends = np.cumsum(counts, dtype=np.int64)
        self.firsts = self.ends - np.array(counts, dtype=np.int64)
        self.batches = 0

    def fill(self, rows: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        picks = rng.integers(0, self.ends[-1], size=len(rows))
        which = np.searchsorted(self.ends, picks, side="right")
        starts = self.lows[which] + picks - self.firsts[which]
        for row, s, start in zip(rows, which.tolist(), starts.tolist()):
            row[:] = self.arrays[s][start : start + self.row_len]
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])


_SEQ_BITS = 40  # a buffer key is length << _SEQ_BITS | (_SEQ_MASK - position in the epoch's stream)
_SEQ_MASK = (1 << _SEQ_BITS) - 1


class _PackedDocuments:
    """Best-fit packing of whole documents from a buffer fed by a seeded permutation per epoch.

    The buffer is a sorted list of int keys (length, then earliest arrival first among equal lengths),
    so finding the largest document that fits is one bisect.
    """

    def __init__(
        self, shards: ShardSet, row_len: int, seed: int, rank: int, world_size: int, buffer_size: int
    ) -> None:
        self.row_len, self.seed, self.rank, self.world_size = row_len, seed, rank, world_size
        self.buffer_size = buffer_size
        self.arrays = [s.array for s in shards.shards]
        self.doc_starts = [s.doc_starts for s in shards.shards]
        self.first_doc = np.cumsum([0] + [s.num_documents for s in shards.shards]).tolist()
        self.lengths = np.concatenate(
            [np.diff(s.doc_starts, append=s.num_tokens) for s in shards.shards] or [np.empty(0, np.int64)]
        )
        if len(self.lengths) <= rank:
            raise ValueError(
                f"{shards.directory} ({shards.split}) has {len(self.lengths)} documents: none for rank {rank}"
            )
        self.epoch, self.position, self.buffer = 0, 0, []
        self.tokens_consumed = self.tokens_cropped = 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        self.stream = order[self.rank :: self.world_size]
        self.stream_lengths = self.lengths[self.stream]

    def _refill(self) -> None:
        if not self.buffer and self.position == len(self.stream):
            self.epoch, self.position = self.epoch + 1, 0
            self._load_epoch()
        end = min(self.position + self.buffer_size - len(self.buffer), len(self.stream))
        for seq, length in enumerate(self.stream_lengths[self.position : end].tolist(), self.position):
            bisect.insort(self.buffer, length << _SEQ_BITS | (_SEQ_MASK - seq))
        self.position = end

    def fill(self, rows: np.ndarray) -> None:
        for row in rows:
            filled = 0
            while filled < self.row_len:
                self._refill()
                remaining = self.row_len - filled
                best = bisect.bisect_right(self.buffer, remaining << _SEQ_BITS | _SEQ_MASK) - 1
                key = self.buffer.pop(max(best, 0))  # nothing fits: crop the shortest
                length, take = key >> _SEQ_BITS, min(key >> _SEQ_BITS, remaining)
                doc = int(self.stream[_SEQ_MASK - (key & _SEQ_MASK)])
                shard = bisect.bisect_right(self.first_doc, doc) - 1
                start = int(self.doc_starts[shard][doc - self.first_doc[shard]])
                row[filled : filled + take] = self.arrays[shard][start : start + take]
                filled += take
                self.tokens_consumed += length
                self.tokens_cropped += length - take

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "buffer": list(self.buffer),
            "tokens_consumed": self.tokens_consumed,
            "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["epoch"]) != self.epoch:
            self.epoch = int(state["epoch"])
            self._load_epoch()
        self.position, self.buffer = int(state["position"]), [int(k) for k in state["buffer"]]
        self.tokens_consumed = int(state["tokens_consumed"])
        self.tokens_cropped = int(state["tokens_cropped"])


# ----- loaders -----------------------------------------------------------------------------------


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's when it is initialized, else 0 of 1."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return rank, world_size


def _to_device(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    return rows if device.type == "cpu" else rows.to(device, non_blocking=True)


class TokenLoader:
    """Endless training batches ``(x, y)``: ``(batch_size, seq_len)`` int64, ``y`` is ``x`` shifted by one.

    Args:
        shards: the split to train on (:meth:`ShardSet.open`).
        batch_size: rows per batch (B).
        seq_len: tokens per row (T); each row reads T+1 tokens.
        mode: ``"random"`` windows or ``"documents"`` rows packed by best fit (see the module docstring).
        seed: the same seed, rank and world size give the same batches; a non-negative int.
        rank, world_size: this process's part; default from ``torch.distributed`` when initialized.
        device: where batches go. On CUDA a background thread prepares the next batch in pinned memory
            while the current step runs, and copies are non-blocking.
        buffer_size: documents the best-fit packing chooses from (``"documents"`` mode).
    """

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        seq_len: int,
        *,
        mode: Mode = "random",
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device = "cpu",
        buffer_size: int = 1024,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or buffer_size < 1 or seed < 0:
            raise ValueError("batch_size, seq_len and buffer_size must be positive and seed non-negative")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.mode, self.seed = mode, seed
        self.device = torch.device(device)
        if mode == "random":
            self._sampler: Any = _RandomWindows(shards, seq_len + 1, seed, self.rank, self.world_size)
        elif mode == "documents":
            args = (seq_len + 1, seed, self.rank, self.world_size, buffer_size)
            self._sampler = _PackedDocuments(shards, *args)
        else:
            raise ValueError(f"mode must be 'random' or 'documents', not {mode!r}")
        # On CUDA the sampler runs ahead in a worker thread; _state is its state after the last batch out.
        self._worker = ThreadPoolExecutor(1, "smallm-loader") if self.device.type == "cuda" else None
        self._next: Future[tuple[torch.Tensor, dict[str, Any]]] | None = None
        self._state = self._sampler.state_dict()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._worker is None:
            rows = self._make_rows()[0]
        else:
            if self._next is None:
                self._next = self._worker.submit(self._make_rows)
            rows, self._state = self._next.result()
            self._next = self._worker.submit(self._make_rows)
        rows = _to_device(rows, self.device)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _make_rows(self) -> tuple[torch.Tensor, dict[str, Any]]:
        shape, pin = (self.batch_size, self.seq_len + 1), self._worker is not None
        rows = torch.empty(shape, dtype=torch.int64, pin_memory=pin)
        self._sampler.fill(rows.numpy())
        return rows, (self._sampler.state_dict() if pin else {})

    def _position(self) -> dict[str, Any]:
        return self._sampler.state_dict() if self._worker is None else self._state

    def _config(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "tokens": self.shards.num_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch returned (plain ints and lists: JSON- and torch.save-able)."""
        return {**self._config(), "position": self._position()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from ``state``; the loader must have the same configuration and data."""
        mismatched = {k: (v, state.get(k)) for k, v in self._config().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(f"loader state is for another configuration: (this, saved) = {mismatched}")
        if self._next is not None:  # drop the batch prepared ahead
            wait([self._next])
            self._next = None
        self._sampler.load_state_dict(state["position"])
        self._state = self._sampler.state_dict()

    @property
    def cropped_fraction(self) -> float:
        """Tokens dropped by cropping / tokens of the documents taken so far (0.0 in ``"random"`` mode)."""
        position = self._position()
        return position.get("tokens_cropped", 0) / max(position.get("tokens_consumed", 0), 1)

    @property
    def epoch(self) -> int:
        """The epoch the documents now drawn belong to (``"documents"`` mode; 0 in ``"random"`` mode)."""
        return self._position().get("epoch", 0)

    def close(self) -> None:
        """Stops the CUDA prefetch thread; a no-op on CPU."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)


class ValidationLoader:
    """One pass over a split in which every token but each shard's first is a target exactly once.

    Rows read T+1 tokens with stride T; a shard's last row is padded (``x`` with the BOS id, ``y`` with
    :data:`IGNORE_INDEX`). Rank r of w takes rows i with i % w == r, so ranks may get a different number
    of batches: sum the loss and the target count and all-reduce once at the end. The last batch may have
    fewer rows. Iterate it again for the next evaluation.
    """

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        seq_len: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        rank, world_size = _rank_and_world(rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.device = torch.device(device)
        T = seq_len
        rows = [(i, start) for i, s in enumerate(shards.shards) for start in range(0, s.num_tokens - 1, T)]
        self.rows = rows[rank::world_size]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin, T = self.device.type == "cuda", self.seq_len
        for first in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[first : first + self.batch_size]
            x = torch.full((len(chunk), T), self.shards.bos_id, dtype=torch.int64, pin_memory=pin)
            y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.int64, pin_memory=pin)
            xs, ys = x.numpy(), y.numpy()
            for row, (shard, start) in enumerate(chunk):
                window = self.shards.shards[shard].array[start : start + T + 1]
                xs[row, : len(window) - 1] = window[:-1]
                ys[row, : len(window) - 1] = window[1:]
            yield _to_device(x, self.device), _to_device(y, self.device)
