"""Reward models: a language model's blocks with a scalar head, as ``transformers``' ``LlamaForSequenceClassification``.

:class:`RewardModel` is a :class:`~smallm.model.lm.SmallLM` with a ``score`` head (``Linear(n_embd, 1)``, no
bias) that reads the final hidden state at the last token of each sequence: ``model(ids, reward_index=i)``
gives one reward per row, ``i`` being each row's last real position (right padding). Its state dict is
the language model's plus ``score.weight``, so the ``model.*`` and ``score.weight`` tensors are exactly
``LlamaForSequenceClassification``'s; the language model's ``lm_head`` stays (frozen, unused) so that a
reward run keeps the shape of its base. :mod:`smallm.interop.hf_export` writes it as that class;
:mod:`smallm.inference.scoring` scores conversations with it.
"""

from __future__ import annotations

import os
from typing import Any, Union

import torch
from torch import Tensor, nn

from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM

__all__ = ["RewardModel"]

PathLike = Union[str, "os.PathLike[str]"]


class RewardModel(SmallLM):
    """See the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.n_embd, 1, bias=False)
        nn.init.normal_(self.score.weight, 0.0, config.init_std)
        if not config.tie_embeddings:
            self.lm_head.requires_grad_(False)  # unused by the reward; kept so the base's weights fit

    @classmethod
    def from_lm(cls, lm: SmallLM) -> RewardModel:
        """A reward model with ``lm``'s weights and a fresh head."""
        model = cls(lm.config)
        model.load_state_dict(lm.state_dict(), strict=False)
        return model.to(next(lm.parameters()).device).train(lm.training)

    def language_model_state(self) -> dict[str, Tensor]:
        """The weights of the language model inside (all but the score head), for ``--init-from``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("score.")}

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, reward_index: Tensor | None = None,
                **options: Any) -> Any:  # fmt: skip
        """With ``reward_index`` (B,): the rewards (B,) fp32 at those positions; otherwise the language model's."""
        if reward_index is None:
            return super().forward(input_ids, targets, **options)
        hidden = self.model(input_ids, None, 0, None)
        last = hidden[torch.arange(len(input_ids), device=input_ids.device), reward_index]
        return self.score(last).squeeze(-1).float()
