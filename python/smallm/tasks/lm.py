"""Pretraining: next-token prediction on the shards ``smallm-tokenize`` writes (its train and val splits).

Training rows are random windows or document-aligned rows of the train split
(:class:`smallm.data.TokenLoader`); validation makes every token of the val split a target once
(:class:`smallm.data.ValidationLoader`); the sample continues ``sample_prompt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from smallm.config import TrainConfig
from smallm.data import ShardSet, TokenLoader, ValidationLoader
from smallm.evaluate import byte_length_table
from smallm.generate import generate_text
from smallm.tasks import RunContext
from smallm.tasks.tokens import TokenLoss
from smallm.tokenizer import Tokenizer

__all__ = ["Pretraining"]


class Pretraining:
    """The :class:`~smallm.tasks.Task` of ``smallm-train``."""

    def __init__(self, cfg: TrainConfig) -> None:
        data = Path(cfg.data) if cfg.data else None
        if data is None or not data.is_dir():
            raise ValueError(f"--data {cfg.data}: not a directory; make one with smallm-tokenize CORPUS --out DIR")
        self.cfg = cfg
        self.train_set = ShardSet.open(data, "train", verify=cfg.verify_data)
        val_set = ShardSet.open(data, "val", verify=cfg.verify_data)
        self.val_set = val_set if val_set.num_tokens > 0 else None
        self.tokenizer = Tokenizer.load(data)

    def attach(self, context: RunContext) -> TokenLoss:
        self.context = context
        # Bytes of text per id (0 for special tokens) turn a loss in nats per token into bits per byte.
        byte_lengths = byte_length_table(self.tokenizer, context.vocab_size, context.runtime.device)
        return TokenLoss(byte_lengths, context.amp_dtype)

    def train_batches(self) -> TokenLoader:
        c = self.context
        return TokenLoader(
            self.train_set, c.batch_size, c.seq_len, mode=self.cfg.sampling, seed=c.seed, rank=c.runtime.rank,
            world_size=c.runtime.world_size, device=c.runtime.device,
        )  # fmt: skip

    def max_steps(self, rows_per_step: int) -> int:
        return self.cfg.max_steps

    def validation_batches(self) -> ValidationLoader | None:
        if self.val_set is None:
            return None
        c = self.context
        return ValidationLoader(
            self.val_set, c.batch_size, c.seq_len, rank=c.runtime.rank, world_size=c.runtime.world_size,
            device=c.runtime.device,
        )  # fmt: skip

    def sample(self, model: nn.Module) -> str:
        """Text generated from ``sample_prompt`` (temperature 0.8, top-k 50)."""
        return generate_text(model, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens, seed=0)

    def run_config(self) -> dict[str, Any]:
        return {}
