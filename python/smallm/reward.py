"""Reward models: a language model's blocks with a scalar head, as ``transformers``' ``LlamaForSequenceClassification``.

:class:`RewardModel` is a :class:`~smallm.model.SmallLM` with a ``score`` head (``Linear(n_embd, 1)``, no
bias) that reads the final hidden state at the last token of each sequence: ``model(ids, reward_index=i)``
gives one reward per row, ``i`` being each row's last real position (right padding). Its state dict is
the language model's plus ``score.weight``, so the ``model.*`` and ``score.weight`` tensors are exactly
``LlamaForSequenceClassification``'s; the language model's ``lm_head`` stays (frozen, unused) so that a
reward run keeps the shape of its base. :func:`export_reward_hf` writes the transformers folder, with
the padding id that class needs to find the last token.

A conversation is scored as fine-tuning encodes it (:func:`smallm.conversations.encode_conversation`:
ChatML, or the model's own chat template), ending with the reply's end of turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from smallm.model import ModelConfig, SmallLM

__all__ = ["RewardModel", "export_reward_hf", "reward_tensors", "score_conversations"]

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

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, reward_index: Tensor | None = None,
                **options: Any) -> Any:  # fmt: skip
        """With ``reward_index`` (B,): the rewards (B,) fp32 at those positions; otherwise the language model's."""
        if reward_index is None:
            return super().forward(input_ids, targets, **options)
        hidden = self.model(input_ids, None, 0, None)
        last = hidden[torch.arange(len(input_ids), device=input_ids.device), reward_index]
        return self.score(last).squeeze(-1).float()


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
    from smallm.conversations import encode_conversation

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


def export_reward_hf(checkpoint_path: PathLike, out_dir: PathLike, *, force: bool = False) -> Path:
    """Writes a reward run's checkpoint as a ``LlamaForSequenceClassification`` folder (one label, the
    padding id set) with its tokenizer files; returns the folder."""
    import safetensors.torch

    from smallm.files import check_destination, write_folder_atomic
    from smallm.hf import (
        _transformers_major,
        hf_config,
        special_tokens_map,
        tokenizer_config,
        tokenizer_json,
    )
    from smallm.runs import load_model

    out = Path(os.path.abspath(out_dir))
    check_destination(out, force, source=checkpoint_path)
    model, tokenizer, _ = load_model(checkpoint_path)
    if not isinstance(model, RewardModel):
        raise ValueError(f"{checkpoint_path} is not a reward model (make one with smallm-rm)")
    config = hf_config(model.config, tokenizer.eot_token, torch.float32, _transformers_major(), tokenizer)
    architecture = config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
    config.update(architectures=[architecture], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    config["pad_token_id"] = tokenizer.bos_id  # how the class finds each row's last token; never in a conversation
    files = {"config.json": config, "tokenizer_config.json": tokenizer_config(model.config, tokenizer),
             "special_tokens_map.json": special_tokens_map(tokenizer)}  # fmt: skip

    def fill(folder: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        safetensors.torch.save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")

    return write_folder_atomic(out, fill)
