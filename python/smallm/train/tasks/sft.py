"""Supervised fine-tuning (``smallm-sft``): conversations rendered as ChatML and packed several per row,
each attending only to itself (:mod:`smallm.data.conversations`); the loss covers the assistant replies and
their ``<|im_end|>``, normalised by the supervised tokens of the whole step."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from smallm.data.conversations import (
    Messages,
    PackedRows,
    RowBatches,
    encode_conversation,
    pack_examples,
    read_conversations,
)
from smallm.inference.evaluate import byte_length_table
from smallm.train.config import FinetuneConfig
from smallm.train.tasks import Batch, RunContext, Task
from smallm.train.tasks.chat import ChatData
from smallm.train.tasks.tokens import TokenLoss

__all__ = ["SFT"]


class SFT(Task):
    """The :class:`~smallm.train.tasks.Task` of ``smallm-sft``."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.data = ChatData(cfg, read_conversations)
        self.tokenizer = self.data.tokenizer

    def attach(self, context: RunContext) -> TokenLoss:
        self.context = context
        self.rows = self._pack(self.data.train, "training")
        self.val_rows = self._pack(self.data.val, "validation") if self.data.val else None
        context.runtime.log(
            f"{len(self.data.train)} conversations in {len(self.rows)} rows of {context.seq_len} tokens "
            f"({self.rows.fill:.0%} filled), {self.rows.supervised_tokens} supervised tokens"
        )
        byte_lengths = byte_length_table(self.tokenizer, context.vocab_size, context.runtime.device)
        return TokenLoss(byte_lengths, context.amp_dtype)

    def _pack(self, conversations: list[Messages], what: str) -> PackedRows:
        seq_len = self.context.seq_len
        examples = [encode_conversation(self.tokenizer, m) for m in conversations]
        rows = pack_examples(examples, seq_len, self.data.pad_id())
        if rows.dropped:
            warnings.warn(
                f"{rows.dropped} of {len(conversations)} {what} conversations are longer than the context of "
                f"{seq_len} tokens (or supervise nothing) and were left out",
                stacklevel=3,
            )
        if len(rows) == 0 and what == "training":
            raise ValueError(f"{self.cfg.data}: no conversation fits in {seq_len} tokens; raise --seq-len")
        return rows

    def train_batches(self) -> RowBatches:
        c = self.context
        return RowBatches(
            self.rows, c.batch_size, seed=c.seed, rank=c.runtime.rank, world_size=c.runtime.world_size,
            device=c.runtime.device,
        )  # fmt: skip

    def max_steps(self, rows_per_step: int) -> int:
        return self.data.max_steps(len(self.rows), rows_per_step, self.context.runtime)

    def validation_batches(self) -> list[Batch] | None:
        rows = self.val_rows
        if rows is None or len(rows) == 0:
            return None
        runtime, B = self.context.runtime, self.context.batch_size
        mine = np.arange(runtime.rank, len(rows), runtime.world_size)
        tensor = lambda a: torch.from_numpy(a).to(runtime.device)  # noqa: E731
        return [
            (tensor(rows.x[i]), tensor(rows.y[i]), tensor(rows.segments[i]))
            for i in (mine[s : s + B] for s in range(0, len(mine), B))
        ]

    def sample(self, model: nn.Module) -> str:
        return self.data.sample_reply(model, self.data.train[0])

    def run_config(self) -> dict[str, Any]:
        return self.data.run_config()
