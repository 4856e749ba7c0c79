"""The next-token objective that pretraining and SFT share: cross entropy summed over the supervised
targets, reported as the mean per target token, validated as loss, perplexity and bits per byte."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from smallm.data.loader import IGNORE_INDEX
from smallm.inference.evaluate import loss_sums, metrics_from_sums
from smallm.train.tasks import Batch

__all__ = ["TokenLoss"]


class TokenLoss:
    """The :class:`~smallm.train.tasks.Objective` of next-token prediction. ``byte_lengths``: the UTF-8 bytes
    of every id (:func:`smallm.inference.evaluate.byte_length_table`), for bits per byte."""

    def __init__(self, byte_lengths: Tensor, amp_dtype: torch.dtype | None) -> None:
        self.byte_lengths, self.amp_dtype = byte_lengths, amp_dtype

    def count(self, batch: Batch) -> Tensor:
        return batch[1].ne(IGNORE_INDEX).sum()

    def loss(self, net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        x, y, *rest = batch
        _, loss = net(x, y, reduction="sum", segment_ids=rest[0] if rest else None)
        return loss, loss.detach()[None]

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        return {"loss": (stats[0] / count).item()}

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> Tensor:
        return loss_sums(model, batches, self.byte_lengths, self.amp_dtype)

    def validation_metrics(self, sums: Tensor) -> dict[str, float]:
        metrics = metrics_from_sums(sums)
        if not metrics:
            return {}
        return {"val_loss": metrics["loss"], "val_ppl": metrics["perplexity"], "val_bpb": metrics["bits_per_byte"]}
