"""Fine-tuning data: chat conversations for SFT and preference pairs for DPO, read from JSON Lines.

SFT file, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

DPO file, one pair per line: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` where the prompt is a
string (one user turn) or a message list, and each answer a string (one assistant turn) or a message list.

Conversations are rendered as ChatML exactly like :func:`smallm.text.chat.chatml_ids` (so what the model
learns is what ``smallm-chat`` and Hugging Face's chat template give it at inference). Only assistant
turns are supervised: their content and their closing ``<|im_end|>`` (so the model learns to stop), not
the role header nor the newline after the turn. Several conversations are packed into each training row
by best fit; ``segment_ids`` keep them apart (each attends only to itself, positions restart), so a
packed row trains exactly as its conversations would one by one. A conversation longer than the
context is dropped and counted, never cut: a truncated answer would teach the model to stop mid-reply
without its ``<|im_end|>``.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from smallm.data.loader import IGNORE_INDEX
from smallm.errors import SmallmError
from smallm.text.chat import IM_END, IM_START, conversation_ids
from smallm.text.tokenizer import Tokenizer

__all__ = [
    "ROLES",
    "DataError",
    "EncodedPair",
    "Example",
    "PackedRows",
    "PairBatches",
    "RowBatches",
    "check_messages",
    "encode_conversation",
    "encode_pairs",
    "json_lines",
    "pack_examples",
    "read_conversations",
    "read_pairs",
    "read_replies",
    "turns_of",
]

PathLike = Union[str, "os.PathLike[str]"]
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class DataError(SmallmError, ValueError):
    """A fine-tuning file is malformed; the message names the file, the line and what is wrong."""


@dataclass
class Example:
    """One encoded conversation: its ids and which of them the loss supervises."""

    ids: np.ndarray
    """int64 ids of the whole ChatML conversation."""
    supervised: np.ndarray
    """bool, per id: True for the tokens of assistant replies and their ``<|im_end|>``."""


# ----- reading --------------------------------------------------------------------------------------


def json_lines(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from e
    with handle:
        for number, raw in enumerate(handle, 1):  # lines as bytes, so a decoding error knows its line
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from e
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from e


def check_messages(value: Any, where: str, field: str) -> Messages:
    """``value`` as a message list, or a :class:`DataError` naming ``where`` and ``field``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def read_conversations(path: PathLike) -> list[Messages]:
    """The conversations of an SFT file (``{"messages": [...]}`` per line). Raises :class:`DataError`
    naming the line for malformed JSON, a missing or malformed message list, an unknown role, or a
    conversation without an assistant turn (nothing to learn from)."""
    conversations = []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        if not isinstance(record, Mapping) or "messages" not in record:
            raise DataError(f"{where}: expected an object with a 'messages' list")
        messages = check_messages(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn, so nothing in it would be learned")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: holds no conversation")
    return conversations


def turns_of(value: Any, where: str, field: str, role: str) -> Messages:
    """A field that is a string (one turn of ``role``) or a message list, as messages."""
    return [{"role": role, "content": value}] if isinstance(value, str) else check_messages(value, where, field)


def read_replies(path: PathLike) -> list[Messages]:
    """The conversations to score of a file: ``{"messages": [...]}`` per line, or ``{"prompt": ..., "reply":
    ...}`` (a string prompt is one user turn, a string reply one assistant turn). Each must end with an
    assistant turn. Raises :class:`DataError` naming the line."""
    conversations = []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        if isinstance(record, Mapping) and "messages" in record:
            messages = check_messages(record["messages"], where, "messages")
        elif isinstance(record, Mapping) and "prompt" in record and "reply" in record:
            parts = []
            for field, role in (("prompt", "user"), ("reply", "assistant")):
                parts += turns_of(record[field], where, field, role)
            messages = parts
        else:
            raise DataError(f"{where}: expected an object with 'messages', or with 'prompt' and 'reply'")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with the assistant turn to score")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: holds no conversation to score")
    return conversations


def read_pairs(path: PathLike) -> list[tuple[Messages, Messages, Messages]]:
    """The (prompt, chosen, rejected) message lists of a DPO file. A string prompt is one user turn, a
    string answer one assistant turn; answers given as lists must hold an assistant turn."""
    pairs = []
    for number, record in json_lines(path):
        where = f"{path}:{number}"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
        parts = []
        for field, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
            parts.append(turns_of(record[field], where, field, role))
        for field, answer in zip(("chosen", "rejected"), parts[1:]):
            if not any(m["role"] == "assistant" for m in answer):
                raise DataError(f"{where}: {field!r} has no assistant turn")
        if parts[1] == parts[2]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same; the pair carries no preference")
        pairs.append((parts[0], parts[1], parts[2]))
    if not pairs:
        raise DataError(f"{path}: holds no pair")
    return pairs


# ----- encoding -------------------------------------------------------------------------------------


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], supervise_from: int = 0
) -> Example:
    """The ChatML ids of ``messages`` (as :func:`smallm.text.chat.chatml_ids`) and the supervision mask: the
    content and ``<|im_end|>`` of the assistant turns from message ``supervise_from`` on. A token that
    straddles the end of the role header and the start of the content counts as content. A tokenizer
    with its own chat template renders with it instead (:func:`smallm.text.chat.conversation_ids`)."""
    templated = conversation_ids(tokenizer, messages, supervise_from)
    if templated is not None:
        return Example(np.asarray(templated[0], dtype=np.int64), templated[1])
    specials = tokenizer.special_tokens
    if IM_START not in specials or IM_END not in specials:
        raise ValueError(f"the tokenizer has no {IM_START} / {IM_END} special tokens, which ChatML needs")
    start, end = specials[IM_START], specials[IM_END]
    byte_lengths = tokenizer.token_byte_lengths()
    newline = tokenizer.encode_ordinary("\n")
    ids: list[int] = []
    supervised: list[bool] = []
    for i, m in enumerate(messages):
        body = tokenizer.encode_ordinary(f"{m['role']}\n{m['content']}")
        learn = m["role"] == "assistant" and i >= supervise_from
        header = len((m["role"] + "\n").encode("utf-8"))
        ends = np.cumsum([byte_lengths[t] for t in body]) if body else np.zeros(0)
        ids += [start, *body, end, *newline]
        supervised += [False, *(learn & (ends > header)).tolist(), learn, *([False] * len(newline))]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(supervised, dtype=bool))


# ----- packing SFT rows -----------------------------------------------------------------------------


@dataclass
class PackedRows:
    """Training rows of ``seq_len`` tokens, several conversations each. ``x`` are the inputs, ``y`` the
    targets (-100 where not supervised, and over padding), ``segments`` which conversation of the row a
    token belongs to (padding: one past the last)."""

    x: np.ndarray
    y: np.ndarray
    segments: np.ndarray
    dropped: int
    """Conversations left out because they are longer than the context."""
    tokens: int = 0
    """Positions holding conversation tokens (the rest is padding)."""

    def __len__(self) -> int:
        return len(self.x)

    @property
    def supervised_tokens(self) -> int:
        return int((self.y != IGNORE_INDEX).sum())

    @property
    def fill(self) -> float:
        """The share of row positions holding a conversation rather than padding."""
        return self.tokens / self.x.size if self.x.size else 0.0


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Packs the examples into rows by best fit decreasing (each goes into the fullest row it fits).
    An example of L ids takes L - 1 positions (inputs ids[:-1], targets ids[1:]); those longer than
    ``seq_len`` are dropped and counted, and so are those with no supervised target."""
    items = []
    dropped = 0
    for e in examples:
        n = len(e.ids) - 1
        if n > seq_len or n < 1 or not e.supervised[1:].any():
            dropped += 1
            continue
        items.append(e)
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row), sorted
    for i in order:
        need = len(items[i].ids) - 1
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    x = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros((len(rows), seq_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            e = items[i]
            n = len(e.ids) - 1
            x[r, at : at + n] = e.ids[:-1]
            y[r, at : at + n] = np.where(e.supervised[1:], e.ids[1:], IGNORE_INDEX)
            segments[r, at : at + n] = s
            at += n
        segments[r, at:] = len(members)
    return PackedRows(x, y, segments, dropped, sum(len(items[i].ids) - 1 for i in order))


# ----- DPO pairs ------------------------------------------------------------------------------------


@dataclass
class EncodedPair:
    chosen: Example
    rejected: Example


def encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[tuple[Messages, Messages, Messages]], max_len: int
) -> tuple[list[EncodedPair], int]:
    """The encoded pairs (only the answers supervised) and how many were dropped for being longer than
    ``max_len`` + 1 ids on either side."""
    encoded, dropped = [], 0
    for prompt, chosen, rejected in pairs:
        c = encode_conversation(tokenizer, prompt + chosen, supervise_from=len(prompt))
        r = encode_conversation(tokenizer, prompt + rejected, supervise_from=len(prompt))
        if max(len(c.ids), len(r.ids)) - 1 > max_len:
            dropped += 1
            continue
        encoded.append(EncodedPair(c, r))
    return encoded, dropped


# ----- batches --------------------------------------------------------------------------------------


class _Stream:
    """Indices 0..n-1 in a fresh seeded permutation each epoch, as one endless stream; every rank draws
    the same stream and keeps its own stride of each global batch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
            step = min(count - len(out), self.n - self.offset)
            out += self._order[self.offset : self.offset + step].tolist()
            self.offset += step
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("n"), state.get("seed")) != (self.n, self.seed):
            raise ValueError(
                f"the saved data position is for {state.get('n')} items with seed {state.get('seed')}; this run "
                f"has {self.n} with seed {self.seed} (was the data file or --seq-len changed?)"
            )
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation()


class _Batches:
    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> None:
        if n < 1:
            raise ValueError("no training examples are left")
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.device = torch.device(device)
        self.stream = _Stream(n, seed)

    def __iter__(self) -> _Batches:
        return self

    def _indices(self) -> list[int]:
        return self.stream.take(self.batch_size * self.world_size)[self.rank :: self.world_size]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @property
    def epoch(self) -> float:
        """Epochs done, with the fraction of the current one."""
        return self.stream.epoch + self.stream.offset / self.stream.n

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "batch_size": self.batch_size, **self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("world_size"), state.get("batch_size")) != (self.world_size, self.batch_size):
            raise ValueError(
                f"the saved data position is for {state.get('world_size')} rank(s) of batch {state.get('batch_size')}; "
                f"resume with the same (this run: {self.world_size} of {self.batch_size})"
            )
        self.stream.load_state_dict(state)


class RowBatches(_Batches):
    """Endless ``(x, y, segment_ids)`` batches of packed SFT rows, reshuffled every epoch."""

    def __init__(
        self, rows: PackedRows, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        super().__init__(len(rows), batch_size, seed, rank, world_size, torch.device(device))
        self.rows = rows

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = self._indices()
        return self._tensor(self.rows.x[i]), self._tensor(self.rows.y[i]), self._tensor(self.rows.segments[i])


def pair_tensors(pairs: Sequence[EncodedPair], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of 2B right-padded rows: the B chosen sequences, then the B rejected ones. Right
    padding needs no attention mask: no real token attends to a later position."""
    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(e.ids) for e in examples) - 1
    x = np.full((len(examples), T), pad_id, dtype=np.int64)
    y = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for r, e in enumerate(examples):
        n = len(e.ids) - 1
        x[r, :n] = e.ids[:-1]
        y[r, :n] = np.where(e.supervised[1:], e.ids[1:], IGNORE_INDEX)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


class PairBatches(_Batches):
    """Endless ``(x, y)`` batches of DPO pairs (see :func:`pair_tensors`), reshuffled every epoch."""

    def __init__(
        self, pairs: Sequence[EncodedPair], batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0,
        world_size: int = 1, device: str | torch.device = "cpu",
    ) -> None:  # fmt: skip
        super().__init__(len(pairs), batch_size, seed, rank, world_size, torch.device(device))
        self.pairs, self.pad_id = pairs, pad_id

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_tensors([self.pairs[i] for i in self._indices()], self.pad_id, self.device)
