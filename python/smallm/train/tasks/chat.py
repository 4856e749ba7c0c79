"""What SFT and DPO share: a base checkpoint and its tokenizer, a JSON Lines file with a held-out split,
steps counted in epochs, the ``finetune`` section of the run config, and a ChatML sample reply; and what
DPO and the reward model share on top: preference pairs encoded to fit the context, their batches, and
the objectives' counting and validation pass."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from smallm.data.conversations import EncodedPair, Messages, PairBatches, encode_pairs, pair_tensors, read_pairs
from smallm.inference.generate import generate_ids, stop_ids_of
from smallm.run.load import find_tokenizer, read_config, resolve_checkpoint
from smallm.text.chat import prompt_ids, with_chat_format
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import FinetuneConfig
from smallm.train.distributed import Runtime
from smallm.train.tasks import RunContext, Task

__all__ = ["ChatData", "PairObjective", "PairTask", "held_out"]


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


class PairObjective:
    """What the DPO and reward-model objectives share: a batch is 2B rows (the B chosen sides, then the B
    rejected ones), a step is counted in pairs, and the last of a batch's stats is its number of pairs.
    A subclass gives :meth:`pair_stats` (the summed loss and the stats of one batch) and
    :meth:`train_metrics`."""

    stats_size: int
    """How many stats :meth:`pair_stats` returns (the pairs last)."""

    def count(self, batch: Any) -> Tensor:
        return torch.tensor(batch[0].shape[0] // 2, device=batch[0].device)

    def pair_stats(self, net: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        return self.pair_stats(net, batch)

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Tensor:
        """The summed stats of ``batches``, the model in eval mode meanwhile."""
        sums = torch.zeros(self.stats_size, dtype=torch.float64, device=next(model.parameters()).device)
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                sums += self.pair_stats(model, batch)[1].to(sums.device)
        finally:
            model.train(was_training)
        return sums

    def validation_metrics(self, sums: Tensor) -> dict[str, float]:
        if sums[-1] == 0:
            return {}
        return {f"val_{k}": v for k, v in self.train_metrics(sums, sums[-1]).items()}


class PairTask(Task):
    """The part of a :class:`~smallm.train.tasks.Task` that DPO and the reward model share: the pairs of
    ``cfg.data`` (:func:`smallm.data.conversations.read_pairs`), encoded once the context is known, and their
    training and validation batches. A subclass says how a batch of pairs becomes tensors
    (:meth:`rows`, :attr:`batches`) and how many positions past an encoded pair its rows need
    (:attr:`spare`: DPO's rows are the ids but the last, the reward model's all of them)."""

    batches: type[PairBatches] = PairBatches
    spare = 0

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        self.data = ChatData(cfg, read_pairs)
        self.tokenizer = self.data.tokenizer

    def rows(self, pairs: list[EncodedPair], device: Any) -> tuple[Any, ...]:
        """The tensors of a batch of pairs (:func:`smallm.data.conversations.pair_tensors`)."""
        return pair_tensors(pairs, self.data.pad_id(), device)

    def encode(self, context: RunContext) -> None:
        """Encodes the training and validation pairs for ``context`` (refusing a file of which none fits)."""
        self.context = context
        self.pairs = self._encode(self.data.train, "training")
        if not self.pairs:
            raise ValueError(f"{self.cfg.data}: no pair fits in {context.seq_len} tokens; raise --seq-len")
        self.val_pairs = self._encode(self.data.val, "validation")
        context.runtime.log(f"{len(self.pairs)} preference pairs")

    def _encode(self, pairs: list[Any], what: str) -> list[EncodedPair]:
        encoded, dropped = encode_pairs(self.tokenizer, pairs, self.context.seq_len - self.spare)
        if dropped:
            warnings.warn(
                f"{dropped} of {len(pairs)} {what} pairs are longer than the context of {self.context.seq_len} "
                "tokens and were left out",
                stacklevel=4,
            )
        return encoded

    def train_batches(self) -> PairBatches:
        c = self.context
        return self.batches(
            self.pairs, c.batch_size, self.data.pad_id(), seed=c.seed, rank=c.runtime.rank,
            world_size=c.runtime.world_size, device=c.runtime.device,
        )  # fmt: skip

    def max_steps(self, rows_per_step: int) -> int:
        return self.data.max_steps(len(self.pairs), rows_per_step, self.context.runtime)

    def validation_batches(self) -> list[Any] | None:
        if not self.val_pairs:
            return None
        runtime, B = self.context.runtime, self.context.batch_size
        mine = self.val_pairs[runtime.rank :: runtime.world_size]
        return [self.rows(mine[s : s + B], runtime.device) for s in range(0, len(mine), B)]

    def run_config(self) -> dict[str, Any]:
        return self.data.run_config()
