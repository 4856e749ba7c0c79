"""Scoring conversations with a reward model (:class:`~smallm.model.reward.RewardModel`).

A conversation is scored as fine-tuning encodes it (:func:`smallm.data.conversations.encode_conversation`:
ChatML, or the model's own chat template), ending with the reply's end of turn; the reward is read at
that last token. Rows of a batch are right-padded (:func:`reward_tensors`), as reward-model training
batches them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from smallm.data.conversations import encode_conversation
from smallm.files.destination import Artifact
from smallm.model.reward import RewardModel

__all__ = ["SCORED", "reward_tensors", "score_conversations"]


def _scored(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as file:
            record = json.loads(file.readline())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "score" in record


SCORED = Artifact("scored conversations (smallm-score's)", _scored)
"""``smallm-score --out`` as an output, for :func:`smallm.files.destination.claim`."""


def reward_tensors(sequences: Sequence[np.ndarray], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ids, reward_index)``: the sequences right-padded with ``pad_id`` and each one's last position."""
    T = max(len(s) for s in sequences)
    ids = np.full((len(sequences), T), pad_id, dtype=np.int64)
    for r, s in enumerate(sequences):
        ids[r, : len(s)] = s
    last = np.array([len(s) - 1 for s in sequences], dtype=np.int64)
    return torch.from_numpy(ids).to(device), torch.from_numpy(last).to(device)


@torch.no_grad()
def score_conversations(model: RewardModel, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]],
                        batch_size: int = 16) -> list[float]:  # fmt: skip
    """The reward of each conversation (message lists), encoded as fine-tuning encodes them."""
    device = next(model.parameters()).device
    pad = tokenizer.bos_id if tokenizer.bos_id is not None else 0
    context = model.config.max_seq_len
    encoded = [encode_conversation(tokenizer, c).ids for c in conversations]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > context]
    if too_long:
        raise ValueError(
            f"conversation {too_long[0]} has {len(encoded[too_long[0]])} tokens, over the context {context}"
        )
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(encoded), batch_size):
            ids, last = reward_tensors(encoded[start : start + batch_size], pad, device)
            scores += model(ids, reward_index=last).tolist()
    finally:
        model.train(was_training)
    return scores
