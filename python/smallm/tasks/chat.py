"""What SFT and DPO share: a base checkpoint and its tokenizer, a JSON Lines file with a held-out split,
steps counted in epochs, the ``finetune`` section of the run config, and a ChatML sample reply."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from smallm.chat import prompt_ids, with_chat_format
from smallm.config import FinetuneConfig
from smallm.conversations import Messages
from smallm.distributed import Runtime
from smallm.generate import generate_ids, stop_ids_of
from smallm.runs import find_tokenizer, read_config, resolve_checkpoint
from smallm.tokenizer import Tokenizer

__all__ = ["ChatData", "held_out"]


def held_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded random ``fraction`` of the items (at least one) held out, when
    there are at least 20 items and a positive fraction; otherwise no validation."""
    if fraction <= 0 or len(items) < 20:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, round(fraction * len(items)))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


class ChatData:
    """The base checkpoint a fine-tuning run starts from, its tokenizer, and the run's items (read from
    ``cfg.data`` by ``read``), split into training and validation."""

    def __init__(self, cfg: FinetuneConfig, read: Callable[[Any], list[Any]]) -> None:
        self.cfg = cfg
        self.base = resolve_checkpoint(cfg.init_from or "")
        # A base without a chat template or ChatML's markers gets the markers (the model grows to match).
        self.tokenizer: Tokenizer = with_chat_format(find_tokenizer(self.base, read_config(self.base)))
        items = read(cfg.data)
        if cfg.val_data:
            self.train, self.val = items, read(cfg.val_data)
        else:
            self.train, self.val = held_out(items, cfg.val_fraction, cfg.seed)

    def pad_id(self) -> int:
        """The id in padding positions (never a target): the document start, else 0."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0

    def max_steps(self, n_rows: int, rows_per_step: int, runtime: Runtime) -> int:
        """``max_steps``, or the steps that ``epochs`` passes over ``n_rows`` take."""
        if self.cfg.max_steps:
            return self.cfg.max_steps
        steps = max(1, math.ceil(self.cfg.epochs * n_rows / rows_per_step))
        runtime.log(f"{self.cfg.epochs:g} epoch(s) of {n_rows} take {steps} steps")
        return steps

    def run_config(self) -> dict[str, Any]:
        return {"finetune": {"method": self.cfg.method, "base": str(Path(os.path.abspath(self.base)))}}

    def sample_reply(self, model: nn.Module, first: Messages) -> str:
        """A reply to ``sample_prompt`` as a user turn, or to the opening of the conversation ``first``."""
        if self.cfg.sample_prompt:
            messages = [{"role": "user", "content": self.cfg.sample_prompt}]
        else:
            messages = first[: next(i for i, m in enumerate(first) if m["role"] == "assistant")]
        prompt = prompt_ids(self.tokenizer, messages)
        room = max(1, min(self.cfg.sample_tokens, model.config.max_seq_len - len(prompt)))
        stops = stop_ids_of(self.tokenizer)
        ids = generate_ids(model, prompt, room, seed=0, stop_ids=stops, vocab_size=self.tokenizer.vocab_size)
        return self.tokenizer.decode(ids)
