"""Direct preference optimization (``smallm-dpo``; Rafailov et al. 2023) against the frozen start.

For each pair, with the log-probabilities of the answers summed over their tokens,
``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, normalised by the pairs of the whole
step. The reference is the starting model, frozen: under LoRA the same network with its adapters disabled
(no second copy), otherwise a copy made before training. Logged: the implicit rewards
``beta * (pi - ref)`` of chosen and rejected answers, their margin and the preference accuracy (how often
the chosen answer's reward is the higher).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smallm.train.config import DPOConfig
from smallm.train.tasks import Batch, RunContext
from smallm.train.tasks.chat import PairObjective, PairTask

__all__ = ["DPO", "PreferenceLoss"]


class PreferenceLoss(PairObjective):
    """The DPO :class:`~smallm.train.tasks.Objective`: batches are ``(x, y)`` of 2B rows, the B chosen answers
    then the B rejected ones; the stats are the sums of [loss, chosen reward, rejected reward, pairs the
    chosen answer wins, pairs]."""

    stats_size = 5

    def __init__(
        self,
        beta: float,
        reference: Callable[[], AbstractContextManager[nn.Module]],
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> None:
        self.beta, self.reference, self.autocast = beta, reference, autocast

    def sequence_logps(self, net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Summed log-probability of each row's supervised targets (the answer), fp32."""
        with self.autocast():
            _, losses = net(x, y, reduction="none")
        return -losses.sum(dim=-1)

    def pair_stats(self, net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """(summed DPO loss, the stats) of one batch."""
        x, y = batch[0], batch[1]
        policy = self.sequence_logps(net, x, y)
        with torch.no_grad(), self.reference() as reference:
            was_training = reference.training
            reference.eval()
            ref = self.sequence_logps(reference, x, y)
            reference.train(was_training)
        B = x.shape[0] // 2
        reward = self.beta * (policy - ref)  # implicit rewards; only their difference has a gradient
        margin = reward[:B] - reward[B:]
        loss = -F.logsigmoid(margin).sum()
        r = reward.detach()
        stats = torch.stack([loss.detach(), r[:B].sum(), r[B:].sum(), (margin > 0).sum().float(), torch.tensor(B)])
        return loss, stats.double()

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        loss, chosen, rejected, correct, pairs = stats.tolist()
        n = max(pairs, 1.0)
        return {
            "loss": loss / n,
            "reward_chosen": chosen / n,
            "reward_rejected": rejected / n,
            "reward_margin": (chosen - rejected) / n,
            "reward_accuracy": correct / n,
        }


class DPO(PairTask):
    """The :class:`~smallm.train.tasks.Task` of ``smallm-dpo``."""

    cfg: DPOConfig

    def attach(self, context: RunContext) -> PreferenceLoss:
        self.encode(context)
        return PreferenceLoss(self.cfg.beta, context.frozen_start(), context.autocast)

    def sample(self, model: nn.Module) -> str:
        prompt, chosen, _ = self.data.train[0]
        return self.data.sample_reply(model, prompt + chosen)
