"""How training rows are drawn from memory-mapped shards: the samplers behind
:class:`~smallm.data.loader.TokenLoader` (see its module for the modes, their guarantees and how ranks split
the data).

* :class:`RandomWindows`: windows of T+1 tokens at uniformly random starts (nanoGPT); batch k is drawn from
  ``np.random.default_rng([seed, rank, k])``, so the whole position is a counter.
* :class:`PackedDocuments`: rows of whole documents by best fit from a buffer of a seeded per-epoch
  permutation (after nanochat's BOS-aligned loader; the module docstring of :mod:`smallm.data.loader` says
  how it differs).
* :class:`Mixture`: each row's source drawn by weight from the seed, the rank and the batch; each source keeps
  its own position.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from smallm.data.shardset import ShardSet

__all__ = ["DataExhausted", "Mixture", "PackedDocuments", "RandomWindows"]


class RandomWindows:
    """Uniform random windows inside this rank's part of each shard; stateless but for a counter.

    A part shorter than a row is skipped; the others are weighted by their number of window starts.
    """

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


SEQ_BITS = 40  # a buffer key is length << SEQ_BITS | (SEQ_MASK - position in the epoch's stream)
SEQ_MASK = (1 << SEQ_BITS) - 1


class PackedDocuments:
    """Best-fit packing of whole documents from a buffer fed by a seeded permutation per epoch.

    The buffer holds documents that fit in a row, as a sorted list of int keys (length, then earliest
    arrival first among equal lengths), so the largest one that fits is one bisect away. Documents longer
    than a row wait in a queue beside it (counted in ``buffer_size`` too) and each starts a row of its
    own: cropped to the row there, they lose only what no row-aligned packing could keep, whereas
    nanochat's rule (they wait with the others until nothing else fits, then the shortest is cropped)
    crops them at row ends, where little room is left, and lets the longest fill up the buffer.
    """

    def __init__(self, shards: ShardSet, row_len: int, seed: int, rank: int, world_size: int, buffer_size: int) -> None:
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
        self.epoch, self.position = 0, 0
        self.buffer: list[int] = []
        self.too_long: deque[int] = deque()
        self.tokens_consumed = self.tokens_cropped = 0
        self._load_epoch()

    def _load_epoch(self) -> None:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths))
        self.stream = order[self.rank :: self.world_size]
        self.stream_lengths = self.lengths[self.stream]

    def _refill(self) -> None:
        if not self.buffer and not self.too_long and self.position == len(self.stream):
            self.epoch, self.position = self.epoch + 1, 0
            self._load_epoch()
        room = self.buffer_size - len(self.buffer) - len(self.too_long)
        end = min(self.position + room, len(self.stream))
        for seq, length in enumerate(self.stream_lengths[self.position : end].tolist(), self.position):
            key = length << SEQ_BITS | (SEQ_MASK - seq)
            if length > self.row_len:
                self.too_long.append(key)
            else:
                bisect.insort(self.buffer, key)
        self.position = end

    def _pick(self, remaining: int) -> int:
        if remaining == self.row_len and self.too_long:
            return self.too_long.popleft()
        best = bisect.bisect_right(self.buffer, remaining << SEQ_BITS | SEQ_MASK) - 1
        if best >= 0:
            return self.buffer.pop(best)
        return self.buffer.pop(0) if self.buffer else self.too_long.popleft()  # crop the shortest

    def fill(self, rows: np.ndarray) -> None:
        for row in rows:
            filled = 0
            while filled < self.row_len:
                self._refill()
                key = self._pick(self.row_len - filled)
                length = key >> SEQ_BITS
                take = min(length, self.row_len - filled)
                doc = int(self.stream[SEQ_MASK - (key & SEQ_MASK)])
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
            "too_long": list(self.too_long),
            "tokens_consumed": self.tokens_consumed,
            "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["epoch"]) != self.epoch:
            self.epoch = int(state["epoch"])
            self._load_epoch()
        self.position, self.buffer = int(state["position"]), [int(k) for k in state["buffer"]]
        self.too_long = deque(int(k) for k in state["too_long"])
        self.tokens_consumed = int(state["tokens_consumed"])
        self.tokens_cropped = int(state["tokens_cropped"])


class DataExhausted(Exception):
    """A source of a mixture that must not repeat (``repeat=False``) has given all its data."""


MIXTURE_TAG = 0x6D6978  # keeps the mixture's draws apart from the random windows' (same seed, rank, batch)


class Mixture:
    """Rows from several sources: each row's source is drawn by weight from ``default_rng([seed, rank,
    batch, tag])``, then every source's own sampler fills its rows in order, so the position is the batch
    counter and each source's position. A source's epoch: in ``"documents"`` mode its sampler's, in
    ``"random"`` mode the tokens drawn from it over its tokens."""

    def __init__(self, samplers: list[Any], weights: Sequence[float], names: Sequence[str], tokens: Sequence[int],
                 row_len: int, seed: int, rank: int, repeat: bool) -> None:  # fmt: skip
        total = float(sum(weights))
        self.samplers, self.names, self.tokens = samplers, list(names), list(tokens)
        self.p = np.array([w / total for w in weights], dtype=np.float64)
        self.row_len, self.seed, self.rank, self.repeat = row_len, seed, rank, repeat
        self.batches, self.rows = 0, [0] * len(samplers)

    def fill(self, rows: np.ndarray) -> None:
        rng = np.random.default_rng([self.seed, self.rank, self.batches, MIXTURE_TAG])
        which = rng.choice(len(self.samplers), size=len(rows), p=self.p)
        for s, sampler in enumerate(self.samplers):
            picked = np.flatnonzero(which == s)
            if len(picked):
                part = np.empty((len(picked), rows.shape[1]), dtype=rows.dtype)
                sampler.fill(part)
                rows[picked] = part
                self.rows[s] += len(picked)
        self.batches += 1
        if not self.repeat:
            done = [name for name, epoch in zip(self.names, self.epochs()) if epoch >= 1]
            if done:
                raise DataExhausted(f"the source {done[0]} has given all its data and --no-repeat is set")

    def epochs(self) -> list[float]:
        """Per source: the epoch now drawn from (``"documents"``), or passes over its tokens so far (``"random"``)."""
        out = []
        for s, sampler in enumerate(self.samplers):
            if isinstance(sampler, PackedDocuments):
                out.append(float(sampler.epoch))
            else:
                out.append(self.rows[s] * self.row_len / max(self.tokens[s], 1))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "rows": list(self.rows), "sources": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches, self.rows = int(state["batches"]), [int(r) for r in state["rows"]]
        for sampler, position in zip(self.samplers, state["sources"]):
            sampler.load_state_dict(position)
