"""Training only the rows of new tokens: the first stage of adapting a model to an extended vocabulary.

After :meth:`smallm.model.lm.SmallLM.grow_vocab` the new tokens' embedding and head rows are guesses
(means of the rows of the old tokens that spell them), while everything else is trained. EEVE (Kim et
al. 2024) therefore begins by training those rows alone, so that the first, large gradients of the new
tokens do not reach the trained weights. A ``[[stage]]`` with ``train = "new-tokens"`` does that:
:class:`NewRowsOnly` drops every other parameter's gradient before the optimizer step, zeroes the
gradient of the old rows, and after the step puts the old rows back as they were, so that no optimizer
(weight decay, momentum) moves them.
"""

from __future__ import annotations

import torch

from smallm.model.lm import SmallLM

__all__ = ["NewRowsOnly"]


class NewRowsOnly:
    """Restricts the optimizer steps of ``model`` to the embedding and head rows from id ``first`` on."""

    def __init__(self, model: SmallLM, first: int) -> None:
        self.model, self.first = model, first
        rows = {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}  # one when tied
        self.weights = list(rows.values())
        self.kept = set(rows)
        self.old = [w.detach()[:first].clone() for w in self.weights]

    def restrict_gradients(self) -> None:
        """Before the step: no gradient but the new rows'."""
        for p in self.model.parameters():
            if id(p) not in self.kept:
                p.grad = None
        for w in self.weights:
            if w.grad is not None:
                w.grad[: self.first] = 0

    @torch.no_grad()
    def restore(self) -> None:
        """After the step: the old rows as they were before the first restricted step."""
        for w, old in zip(self.weights, self.old):
            w[: self.first].copy_(old)
