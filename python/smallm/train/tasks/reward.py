"""A reward model (``smallm-rm``): a scalar score of a conversation, trained on preference pairs.

The pairs are DPO's (``prompt``, ``chosen``, ``rejected``; strings or message lists), each side encoded as
a whole conversation (:func:`smallm.data.conversations.encode_conversation`). The score head of
:class:`smallm.model.reward.RewardModel` reads the hidden state at the last token of prompt + reply; the loss is
Bradley-Terry's, ``-log sigmoid(r_chosen - r_rejected)``, summed and normalised by the pairs of the whole
step (all micro-batches and ranks). Logged, in training and validation: the loss, the preference accuracy
(how often the chosen reply scores higher) and the mean margin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallm.data.conversations import EncodedPair, PairBatches
from smallm.inference.scoring import reward_tensors
from smallm.train.config import RewardConfig
from smallm.train.tasks import Batch, RunContext
from smallm.train.tasks.chat import PairObjective, PairTask

__all__ = ["BradleyTerryLoss", "RewardModeling"]


def pair_rows(pairs: list[EncodedPair], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ids, last)`` of 2B rows: the B chosen conversations, then the B rejected ones."""
    sequences: list[np.ndarray] = [p.chosen.ids for p in pairs] + [p.rejected.ids for p in pairs]
    return reward_tensors(sequences, pad_id, device)


class RewardBatches(PairBatches):
    """Endless batches of pairs as whole conversations, reshuffled every epoch."""

    def __next__(self) -> tuple[Tensor, Tensor]:
        return pair_rows([self.pairs[i] for i in self._indices()], self.pad_id, self.device)


class BradleyTerryLoss(PairObjective):
    """The :class:`~smallm.train.tasks.Objective`: batches are ``(ids, last)`` of 2B rows; the stats are the sums of
    [loss, margin, pairs the chosen reply wins, pairs]."""

    stats_size = 4

    def pair_stats(self, net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        ids, last = batch[0], batch[1]
        if ids.shape[0] < 2:
            # The trainer's padding batch of a sharded run (one row, targets in place of positions): every rank
            # must run as many forwards as the others, so it is scored, at position 0, and counts no pair.
            last = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        rewards = net(ids, reward_index=last)
        B = ids.shape[0] // 2
        margin = rewards[:B] - rewards[B:]
        loss = -F.logsigmoid(margin).sum()
        m = margin.detach()
        stats = torch.stack([loss.detach(), m.sum(), (m > 0).sum().float(), torch.tensor(float(B), device=m.device)])
        return loss, stats.double()

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        loss, margin, correct, pairs = stats.tolist()
        n = max(pairs, 1.0)
        return {"loss": loss / n, "accuracy": correct / n, "margin": margin / n}


class RewardModeling(PairTask):
    """The :class:`~smallm.train.tasks.Task` of ``smallm-rm``."""

    batches = RewardBatches
    spare = 1  # a whole conversation is scored, its last id included: it must fit the context itself

    cfg: RewardConfig

    def rows(self, pairs: list[EncodedPair], device: Any) -> tuple[Tensor, Tensor]:
        return pair_rows(pairs, self.data.pad_id(), device)

    def attach(self, context: RunContext) -> BradleyTerryLoss:
        self.encode(context)
        return BradleyTerryLoss()

    def sample(self, model: nn.Module) -> str:
        """The scores of the first training pair's two replies."""
        ids, last = self.rows([self.pairs[0]], self.context.runtime.device)
        with torch.no_grad():
            chosen, rejected = model(ids, reward_index=last).tolist()
        return f"first pair: chosen {chosen:.3f}, rejected {rejected:.3f}"
