"""Training data loader: memory-mapped token shards to ``(x, y)`` batches for next-token prediction.

Batches come from a :class:`~smallm.data.shardset.ShardSet` (the memory-mapped shards of one split); no
shard is ever copied, only the rows of a batch.

:class:`TokenLoader` yields training batches, ``x`` and ``y = x`` shifted by one, both ``(B, T)`` int64:

* ``"random"``: windows of T+1 tokens at uniformly random starts over all shards (nanoGPT). Batch k is
  drawn from ``np.random.default_rng([seed, rank, k])``, so the whole position is the batch counter.
* ``"documents"``: every row starts at a document's BOS and holds whole documents, chosen by best fit
  (after nanochat's BOS-aligned loader) from a buffer of the next ``buffer_size`` (default 1024)
  documents of a seeded per-epoch permutation: the largest document that fits the rest of the row goes
  in; when none fits, the shortest one is cropped to fill the row exactly and its tail is dropped. One
  change to nanochat's rule: a document longer than a row starts a row of its own (cropped there to the
  row) instead of waiting in the buffer, where it would end up cropped to the few tokens left at some
  row's end, and where the longest documents pile up until the buffer is full of them.
  ``cropped_fraction`` is dropped tokens / tokens of the documents taken. ``benches/loader_bench.py``
  measures, for lognormal lengths (median 300 tokens, sigma 1) and buffer 1024, 21% at T=1024 and 8.5%
  at T=2048, near the floor of 18% and 6.7% (the tokens beyond T+1 of every document, which no packing
  of row-aligned documents keeps); nanochat's rule drops 33-36% and 10-21% on the same lengths (it gets
  worse the longer it runs). A bigger buffer barely helps. An epoch uses each document exactly once: the
  buffer drains before the next epoch's permutation starts (a row may straddle the two).

Worker processes: :class:`TokenDataset` is the ``IterableDataset`` for a ``torch.utils.data.DataLoader``
with ``num_workers > 0``: worker i of n on rank r of w reads the part of rank ``r * n + i`` of ``w * n``,
so no two workers repeat a batch, and each maps the shards itself (a :class:`ShardSet` pickles as its
directory, not its tokens). A :class:`TokenLoader` iterated in several workers unsplit would repeat every
batch once per worker, and refuses to. Exact resume is the in-process loader's (the trainer's):
a DataLoader's workers run ahead of the batches it has handed out.

Distributed training: rank r of w gets a disjoint part. In ``"documents"`` mode the documents at
positions i % w == r of each epoch's permutation; in ``"random"`` mode the r-th of w contiguous parts
of every shard. ``state_dict`` / ``load_state_dict`` resume exactly where a loader stopped.

:class:`ValidationLoader` makes every token of a split (except each shard's first), or of token arrays,
a target exactly once: rows of T+1 tokens with stride T, the last row of each padded (y with -100).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch

from smallm.data.sampling import Mixture, PackedDocuments, RandomWindows
from smallm.data.shardset import ShardSet

__all__ = ["IGNORE_INDEX", "TokenDataset", "TokenLoader", "ValidationLoader"]

IGNORE_INDEX = -100
"""The target id no loss counts (``cross_entropy``'s default): padding, and tokens not supervised."""

PathLike = Union[str, "os.PathLike[str]"]
Mode = Literal["random", "documents"]


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
        shards: the split to train on (:meth:`ShardSet.open`), or the splits of a mixture's sources.
        batch_size: rows per batch (B).
        seq_len: tokens per row (T); each row reads T+1 tokens.
        mode: ``"random"`` windows or ``"documents"`` rows packed by best fit (see the module docstring).
        seed: the same seed, rank and world size give the same batches; a non-negative int.
        rank, world_size: this process's part; default from ``torch.distributed`` when initialized.
        device: where batches go. On CUDA rows are made in pinned memory and copied non-blocking.
        buffer_size: documents the best-fit packing chooses from (``"documents"`` mode).
        prefetch: prepare the next batch in a background thread while the current step runs; by
            default on CUDA only.
        weights: with several sources, the share of rows each gives (any positive scale): every row's
            source is drawn by weight, deterministically from the seed, rank and batch.
        names: the sources' names (for :attr:`epochs` and messages); default: their directories' names.
        repeat: whether a source that has given all its data starts again (its epochs are counted); without,
            the batch that would repeat one raises :class:`DataExhausted`.
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
        prefetch: bool | None = None,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        repeat: bool = True,
    ) -> None:
        if batch_size < 1 or seq_len < 1 or buffer_size < 1 or seed < 0:
            raise ValueError("batch_size, seq_len and buffer_size must be positive and seed non-negative")
        if mode not in ("random", "documents"):
            raise ValueError(f"mode must be 'random' or 'documents', not {mode!r}")
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        sources = list(shards) if isinstance(shards, (list, tuple)) else [shards]
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sources) or not all(w > 0 for w in weights):
            raise ValueError(f"weights must be one positive number per source ({len(sources)}), got {weights}")
        self.sources, self.weights = sources, weights
        self.names = list(names) if names is not None else [Path(s.directory).name for s in sources]
        self.shards, self.batch_size, self.seq_len = sources[0], batch_size, seq_len
        self.mode, self.seed, self.repeat = mode, seed, repeat
        self.device = torch.device(device)
        samplers = [self._source_sampler(s, mode, seed, buffer_size) for s in sources]
        if len(sources) == 1 and repeat:
            self._sampler: Any = samplers[0]  # one source: the batches and state of a plain loader
        else:
            tokens = [s.num_tokens // self.world_size for s in sources]
            self._sampler = Mixture(samplers, weights, self.names, tokens, seq_len + 1, seed, self.rank, repeat)
        # With prefetch the sampler runs a batch ahead in a worker thread, so the position of the last
        # batch handed out is kept beside it in _state.
        if prefetch is None:
            prefetch = self.device.type == "cuda"
        self.prefetch, self.buffer_size = prefetch, buffer_size
        self._worker = ThreadPoolExecutor(1, "smallm-loader") if prefetch else None
        self._next: Future[tuple[torch.Tensor, dict[str, Any]]] | None = None
        self._state = self._sampler.state_dict()
        self._split_for_workers = False

    def _source_sampler(self, shards: ShardSet, mode: Mode, seed: int, buffer_size: int) -> Any:
        if mode == "random":
            return RandomWindows(shards, self.seq_len + 1, seed, self.rank, self.world_size)
        return PackedDocuments(shards, self.seq_len + 1, seed, self.rank, self.world_size, buffer_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1 and not self._split_for_workers:
            raise RuntimeError(
                f"a TokenLoader iterated in each of {info.num_workers} DataLoader workers would give every "
                "batch once per worker; give the DataLoader a smallm.data.loader.TokenDataset, which splits the data "
                "between the workers"
            )
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Its configuration and position (the shards pickle as their directory); no prefetch thread.
        options = {
            "mode": self.mode, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "device": self.device, "buffer_size": self.buffer_size, "prefetch": self.prefetch,
            "weights": self.weights, "names": self.names, "repeat": self.repeat,
        }  # fmt: skip
        shards = self.sources if len(self.sources) > 1 else self.shards
        return _rebuild_loader, (shards, self.batch_size, self.seq_len, options, self.state_dict())

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
        shape, pin = (self.batch_size, self.seq_len + 1), self.device.type == "cuda"
        rows = torch.empty(shape, dtype=torch.int64, pin_memory=pin)
        self._sampler.fill(rows.numpy())
        return rows, (self._sampler.state_dict() if self._worker is not None else {})

    def _position(self) -> dict[str, Any]:
        return self._sampler.state_dict() if self._worker is None else self._state

    def _config(self) -> dict[str, Any]:
        config = {
            "mode": self.mode,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "tokens": self.shards.num_tokens,
        }
        if isinstance(self._sampler, Mixture):
            config.update(tokens=[s.num_tokens for s in self.sources], weights=self.weights, repeat=self.repeat)
        return config

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

    def epochs(self) -> dict[str, float]:
        """Per source of a mixture (or the one source): the epoch now drawn from in ``"documents"`` mode,
        the passes over its tokens so far in ``"random"`` mode (reflects the batches made, prefetched ones
        included)."""
        if isinstance(self._sampler, Mixture):
            return dict(zip(self.names, self._sampler.epochs()))
        if self.mode == "random":
            drawn = int(self._position()["batches"]) * self.batch_size * (self.seq_len + 1)
            return {self.names[0]: drawn / max(self.shards.num_tokens // self.world_size, 1)}
        return {self.names[0]: float(self.epoch)}

    def close(self) -> None:
        """Stops the prefetch thread, if any."""
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)


def _rebuild_loader(
    shards: ShardSet, batch_size: int, seq_len: int, options: dict[str, Any], state: dict[str, Any]
) -> TokenLoader:
    loader = TokenLoader(shards, batch_size, seq_len, **options)
    loader.load_state_dict(state)
    return loader


class TokenDataset(torch.utils.data.IterableDataset):
    """:class:`TokenLoader` batches for a ``DataLoader`` (``batch_size=None``: the items are batches)
    with worker processes; each worker reads its own part of this rank's data (see the module
    docstring). The arguments are :class:`TokenLoader`'s; batches are made on the CPU (the DataLoader's
    ``pin_memory`` pins them)."""

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
        buffer_size: int = 1024,
    ) -> None:
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.mode, self.seed, self.buffer_size = mode, seed, buffer_size

    def loader(self, worker: int = 0, workers: int = 1) -> TokenLoader:
        """The loader of worker ``worker`` of ``workers``."""
        loader = TokenLoader(
            self.shards, self.batch_size, self.seq_len, mode=self.mode, seed=self.seed,
            rank=self.rank * workers + worker, world_size=self.world_size * workers, buffer_size=self.buffer_size,
            prefetch=False,
        )  # fmt: skip
        loader._split_for_workers = True
        return loader

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        return iter(self.loader(info.id, info.num_workers) if info is not None else self.loader())


class ValidationLoader:
    """One pass over token streams in which every token but each stream's first is a target exactly once.

    The streams are the shards of a split (a :class:`ShardSet`, padded with its BOS id) or token arrays
    (one document stream each, e.g. text files encoded by :func:`smallm.inference.evaluate.text_tokens`; give
    ``pad_id``). Rows read T+1 tokens with stride T; a stream's last row is padded (``x`` with the pad
    id, ``y`` with :data:`IGNORE_INDEX`). Rank r of w takes rows i with i % w == r, so ranks may get a
    different number of batches: sum the loss and the target count and all-reduce once at the end. The
    last batch may have fewer rows. Iterate it again for the next evaluation.
    """

    def __init__(
        self,
        source: ShardSet | np.ndarray | Sequence[np.ndarray],
        batch_size: int,
        seq_len: int,
        *,
        pad_id: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be positive")
        if isinstance(source, ShardSet):
            self.streams = [s.array for s in source.shards]
            pad_id = source.bos_id if pad_id is None else pad_id
        else:
            self.streams = [source] if isinstance(source, np.ndarray) else list(source)
        if pad_id is None:
            raise ValueError("token arrays need a pad_id for the padding of their last rows")
        rank, world_size = _rank_and_world(rank, world_size)
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.device = torch.device(device)
        rows = [(i, start) for i, s in enumerate(self.streams) for start in range(0, len(s) - 1, seq_len)]
        self.rows = rows[rank::world_size]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pin, T = self.device.type == "cuda", self.seq_len
        for first in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[first : first + self.batch_size]
            x = torch.full((len(chunk), T), self.pad_id, dtype=torch.int64, pin_memory=pin)
            y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.int64, pin_memory=pin)
            xs, ys = x.numpy(), y.numpy()
            for row, (stream, start) in enumerate(chunk):
                window = self.streams[stream][start : start + T + 1]
                xs[row, : len(window) - 1] = window[:-1]
                ys[row, : len(window) - 1] = window[1:]
            yield _to_device(x, self.device), _to_device(y, self.device)
