"""The model: a decoder-only LLaMA-style transformer, small enough to read in one sitting.

Architecture (LLaMA, Touvron et al. 2023), pre-norm: token embedding, then ``n_layer`` blocks of
``x + attn(RMSNorm(x))`` and ``x + mlp(RMSNorm(x))``, a final RMSNorm and the output projection.

* Attention: rotary position embeddings (RoFormer, Su et al. 2021) in Hugging Face's "rotate_half"
  layout (the two halves of a head are the pairs, not interleaved neighbours), grouped-query attention
  (GQA, Ainslie et al. 2023: ``n_kv_head`` key/value heads shared by ``n_head`` query heads), computed by
  ``torch.nn.functional.scaled_dot_product_attention``.
* MLP: SwiGLU (Shazeer 2020), ``down(silu(gate(x)) * up(x))``; the activation can be GELU or ReLU^2.
* RMSNorm (Zhang & Sennrich 2019) in fp32; no biases, except on the query, key and value projections
  with ``qkv_bias`` (as Qwen2 has them). Optionally QK-norm: every query and key head RMS-normalised
  before rotary, as Qwen3 does (Henry et al. 2020; Wortsman et al. 2023).

Module names are those of Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``, ...;
``q_norm``/``k_norm`` as in ``Qwen3ForCausalLM``, the biases as in ``Qwen2ForCausalLM``), so the state
dict loads into each unchanged (the
tests check logits match to 1e-5) and peft
``target_modules`` names transfer as-is. :class:`KVCache` holds keys and values for incremental decoding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from smallm.data.loader import IGNORE_INDEX
from smallm.model.config import ModelConfig
from smallm.model.layers import Decoder, KVCache, RMSNorm

__all__ = ["SmallLM"]


class SmallLM(nn.Module):
    """The language model: Hugging Face's ``LlamaForCausalLM`` with the same state-dict keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights and unit norms. The projections that write into the residual
        stream (o_proj, down_proj) get std / sqrt(2 * n_layer), as in GPT-2: the stream sums 2 * n_layer
        of them, so this keeps its variance at init independent of depth. Call it after to_empty()."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("o_proj", "down_proj"))
                scale = 1 / math.sqrt(2 * self.config.n_layer) if residual else 1.0
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding) and not self.config.tie_embeddings:
                nn.init.normal_(module.weight, 0.0, std)  # tied: lm_head has just drawn it
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int, sources: Mapping[int, Sequence[int]] | None = None) -> None:
        """Grows the embedding table (and an untied lm_head) to ``vocab_size`` rows, each new row the mean
        of the old ones (as ``transformers``' ``resize_token_embeddings`` starts them: a new token begins as
        an average one, so the old tokens' logits barely move), and sets ``config.vocab_size``.

        ``sources`` maps a token id (new, or a padding row the vocabulary now uses) to the old tokens its
        text was spelled with: its embedding row becomes the mean of theirs, and its row of an untied head
        the first one's (EEVE's rule: the model predicts the new token where it predicted the start of its
        text, and reads it as the sum of its parts)."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"the vocabulary only grows: {vocab_size} < {old}")

        def grown(weight: Tensor) -> nn.Parameter:
            rows = weight.mean(0, keepdim=True).expand(vocab_size - old, -1)
            return nn.Parameter(torch.cat([weight, rows.to(weight.dtype)]), requires_grad=weight.requires_grad)

        embed, head = self.model.embed_tokens, self.lm_head
        sources = dict(sources or {})
        first = min(sources, default=vocab_size)
        for token, parts in sources.items():  # read before any row is written: parts lie below every token
            if not parts or max(parts) >= first or not 0 <= token < vocab_size:
                raise ValueError(f"token {token}: its sources {list(parts)} must be ids below {first}")
        if vocab_size > old:
            embed.weight = grown(embed.weight)
            embed.num_embeddings = vocab_size
            head.weight = embed.weight if self.config.tie_embeddings else grown(head.weight)
            head.out_features = vocab_size
            self.config = dataclasses.replace(self.config, vocab_size=vocab_size)
        for token, parts in sources.items():
            embed.weight[token] = embed.weight[list(parts)].mean(0)
            if not self.config.tie_embeddings:
                head.weight[token] = head.weight[parts[0]]

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        attention_mask: Tensor | None = None,
        reduction: Literal["mean", "sum", "none"] = "mean",
        last_only: bool = False,
        segment_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits (B, T, vocab_size) for ``input_ids`` (B, T); with ``targets`` (B, T), ``(logits, loss)``.

        The loss is the cross entropy over targets other than -100, in fp32: their mean, their sum (so a
        trainer can divide by the target count of all its micro-batches) or, with ``"none"``, one loss per
        target (B, T), 0 where ignored. With ``kv_cache``, the T new tokens take positions ``start_pos..``
        and attend to the cached ones before them. ``attention_mask`` (B, start_pos + T with a cache,
        else B, T; 1 = token, 0 = left padding) lets prompts of different lengths share a batch.
        ``last_only`` (no targets): logits of the last position only, (B, 1, vocab_size).
        ``segment_ids`` (B, T): rows packed from several sequences, each attending only to itself and
        with positions restarting at 0 (see :func:`segment_positions_and_mask`).
        """
        B, T = input_ids.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed max_seq_len {self.config.max_seq_len}")
        if kv_cache is not None and (kv_cache.batch_size != B or start_pos + T > kv_cache.max_len):
            raise ValueError(
                f"KV cache of batch {kv_cache.batch_size}, length {kv_cache.max_len} cannot "
                f"take batch {B} at positions {start_pos}..{start_pos + T - 1}"
            )
        h = self.model(input_ids, kv_cache, start_pos, attention_mask, segment_ids)
        if targets is None:
            return self.lm_head(h[:, -1:] if last_only else h)
        # Upcast before the softmax: bf16 logits lose the small differences the loss is made of.
        logits = self.lm_head(h).float()
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
        return logits, loss.view_as(targets) if reduction == "none" else loss

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` (default max_seq_len) tokens,
        in the model's dtype (or ``dtype``, e.g. bf16 under autocast) on its device."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"max_len must be in 1..max_seq_len ({self.config.max_seq_len}), got {max_len}")
        weight = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, dtype or weight.dtype, weight.device)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, a tied matrix counted once. ``exclude_embeddings``: without the token
        embedding table (Kaplan et al.'s non-embedding count; a tied lm_head goes with it)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n
