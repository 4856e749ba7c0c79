"""The parts of a LLaMA block: RMSNorm, rotary embeddings (with Llama 3.1's scaling), grouped-query
attention over a :class:`KVCache`, the gated MLP, the block and the decoder stack, and the attention masks of
padded and packed rows. :mod:`smallm.model.lm` puts the embedding and the output head around them."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from smallm.model.config import ACTIVATIONS, ModelConfig

__all__ = ["Decoder", "KVCache", "RMSNorm", "causal_mask", "segment_positions_and_mask"]

Rope = tuple[Tensor, Tensor]  # the (cos, sin) tables of the positions being computed


class RMSNorm(nn.Module):
    """Root-mean-square norm in fp32, with Hugging Face's order of casts so bf16 results match too."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def llama3_frequencies(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1's scaled rotary frequencies: wavelengths longer than the original context over
    ``low_freq_factor`` are slowed by ``factor``, those shorter than it over ``high_freq_factor`` kept,
    and the ones between interpolated smoothly."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(
        wavelength > context / low, inv_freq / factor, torch.where(wavelength < context / high, inv_freq, blended)
    )


class RotaryEmbedding(nn.Module):
    """cos and sin tables of shape (max_seq_len, head_dim), fp32, indexed by position."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.build_tables(self.cos.device)

    def build_tables(self, device: torch.device) -> None:
        exponents = torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim
        inv_freq = 1.0 / self.theta**exponents
        if self.scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, self.scaling)
        angles = torch.arange(self.max_seq_len, device=device).float()[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # rotate_half layout: dim i pairs with i + head_dim/2
        self.cos, self.sin = angles.cos(), angles.sin()

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # The tables are a function of the config, so rebuild them after every move or cast: this keeps
        # them fp32 under model.to(torch.bfloat16) (bf16 angles near position 2048 are off by whole
        # radians) and makes them valid after to_empty() from the meta device.
        super()._apply(fn, recurse)
        if self.cos.device.type != "meta":
            self.build_tables(self.cos.device)
        return self

    def forward(self, positions: Tensor, dtype: torch.dtype) -> Rope:
        """cos, sin for ``positions`` (B or 1, T), shaped (B or 1, 1, T, head_dim) to broadcast over heads."""
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of ``x`` (B, H, T, head_dim) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of the positions decoded so far, preallocated per layer as
    (batch_size, n_kv_head, max_len, head_dim). The cache has no cursor: ``forward`` writes the new
    positions at ``start_pos`` and attends to everything before them."""

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.batch_size, self.max_len = batch_size, max_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` (B, n_kv_head, T, head_dim) at positions start_pos.. and return all keys and
        values up to the last of them."""
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which KVCache slot is this layer's
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, q_dim, kv_dim = config.n_embd, config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(d, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, d, bias=False)
        # QK-norm (Qwen3): each head's query and key RMS-normalised, with its own gain, before rotary.
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache: KVCache | None, start_pos: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
        # No mask and as many keys as queries: plain causal attention (the flash kernels' fast path).
        # No mask and more keys: a decode step, which sees every cached position.
        is_causal = mask is None and k.size(2) == T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU with the default silu."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache: KVCache | None, start_pos: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm: Hugging Face's ``LlamaModel``, the ``model.`` in the state dict."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: Tensor,
        kv_cache: KVCache | None,
        start_pos: int,
        attention_mask: Tensor | None,
        segment_ids: Tensor | None = None,
    ) -> Tensor:
        B, T = input_ids.shape
        past = start_pos if kv_cache is not None else 0  # positions before these whose keys we attend to
        if segment_ids is not None:
            if segment_ids.shape != (B, T) or kv_cache is not None or attention_mask is not None:
                raise ValueError(
                    f"segment_ids must be (batch, seq) = {(B, T)}, without a KV cache or attention_mask; "
                    f"got {tuple(segment_ids.shape)}"
                )
            positions, mask = segment_positions_and_mask(segment_ids)
        elif attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be (batch, start_pos + seq) = {(B, past + T)} with a "
                    f"KV cache, (batch, seq) without; got {tuple(attention_mask.shape)}"
                )
            # Left padding: a row's positions count its real tokens only, so a padded prompt is rotated
            # exactly like the unpadded one.
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:] + (start_pos - past)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)[None]
        if segment_ids is None:
            mask = causal_mask(T, past, attention_mask, input_ids.device)
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpoint and kv_cache is None:
                # Recompute each block's activations in backward: memory per block drops to its input.
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, None, start_pos, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv_cache, start_pos)
        return self.norm(x)


def causal_mask(T: int, past: int, attention_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Boolean (B or 1, 1, T, past + T) mask of the keys each query may see, or None when SDPA's own
    causal or full masking is exact (no padding, and no past or a single query)."""
    if attention_mask is None and (past == 0 or T == 1):
        return None
    query_pos = torch.arange(past, past + T, device=device)[:, None]
    key_pos = torch.arange(past + T, device=device)[None, :]
    mask = key_pos <= query_pos
    if attention_mask is not None:
        # A padding query would see no key at all, which some SDPA kernels answer with NaN that then
        # leaks through 0 * NaN in the next layer; letting every query see itself keeps padding finite.
        mask = mask & (attention_mask.bool()[:, None, :] | (key_pos == query_pos))
    return mask[:, None] if mask.dim() == 3 else mask[None, None]


def segment_positions_and_mask(segment_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For rows packed from several sequences (``segment_ids`` (B, T): equal ids mark one sequence,
    which must be contiguous): each token's position within its own sequence, and the (B, 1, T, T)
    mask letting a token see only the earlier tokens of its sequence. A packed row then computes
    exactly what its sequences would compute one by one."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    # The index of each token's segment start, carried forward by a running maximum.
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return index - first, (same & causal)[:, None]
