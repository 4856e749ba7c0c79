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
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from smallm.options import doc

__all__ = ["IGNORE_INDEX", "PRESETS", "KVCache", "ModelConfig", "SmallLM"]

IGNORE_INDEX = -100
"""The target id the loss skips (``cross_entropy``'s default): padding, and tokens not supervised."""
MLP_MULTIPLE = 256  # the default intermediate size is rounded up to this, for matmul-friendly shapes
Rope = tuple[Tensor, Tensor]  # the (cos, sin) tables of the positions being computed
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}
"""The MLP activations, by the names transformers' ``hidden_act`` gives them (so exports stay exact)."""

# name -> ModelConfig fields. Parameter counts are at vocab_size 32000 unless said otherwise. The embedding
# and lm_head are untied (with Muon they train at rates of their own: 0.07 bits per byte better on tiny in
# benches/quality.py); tie them with tie_embeddings=True to save vocab x width parameters.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: 300 steps of 2048 tokens take ~4 min on 2 cores; 3.1M parameters in the blocks, 7.3M in all
    # at vocab 8192.
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, n_kv_head=2, max_seq_len=256, tie_embeddings=False),
    # Deep and thin (MobileLLM's advice for small models), one GPU-hour scale; 38.3M params tied, 50.5M untied.
    "38m": dict(n_layer=16, n_embd=384, n_head=6, n_kv_head=3, max_seq_len=1024, tie_embeddings=False),
    # GPT-2 small's shape, full multi-head attention to compare with GPT-2 runs; 124M tied at vocab 50304.
    "124m": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, max_seq_len=1024, tie_embeddings=False),
    # GPT-2 medium's shape, full multi-head attention; 341M tied (374M untied).
    "350m": dict(n_layer=24, n_embd=1024, n_head=16, n_kv_head=16, max_seq_len=1024, tie_embeddings=False),
    # TinyLlama 1.1B (Zhang et al. 2024) exactly: untied, 4 KV heads, its own 32000-id vocabulary.
    "tinyllama-1.1b": dict(
        vocab_size=32000, n_layer=22, n_embd=2048, n_head=32, n_kv_head=4, intermediate_size=5632,
        max_seq_len=2048, rope_theta=10000.0, tie_embeddings=False,
    ),
}  # fmt: skip


@dataclass
class ModelConfig:
    """The shape of a model; everything else about it follows from these fields."""

    vocab_size: int = doc(32000, "number of token ids (embedding rows and logits)")
    n_layer: int = doc(12, "number of transformer blocks")
    n_embd: int = doc(768, "width of the residual stream (d)")
    n_head: int = doc(12, "query heads per attention layer; head_dim = n_embd // n_head")
    n_kv_head: int | None = doc(None, "key/value heads (GQA), a divisor of n_head; None means n_head")
    intermediate_size: int | None = doc(
        None, "SwiGLU hidden width; None means 8/3 n_embd rounded up to a multiple of 256"
    )
    max_seq_len: int = doc(1024, "context length: what the rotary tables and KV caches cover")
    rope_theta: float = doc(10000.0, "base of the rotary frequencies (larger suits longer contexts)")
    norm_eps: float = doc(1e-5, "epsilon added to the mean square in RMSNorm")
    tie_embeddings: bool = doc(True, "share one matrix between embed_tokens and lm_head")
    init_std: float = doc(0.02, "standard deviation of the normal init of linear and embedding weights")
    qk_norm: bool = doc(False, "RMSNorm each query and key head before rotary (Qwen3's; exported as Qwen3ForCausalLM)")
    hidden_act: str = doc("silu", "the gated MLP's activation: silu (SwiGLU), gelu_pytorch_tanh (GeGLU) or relu2")
    qkv_bias: bool = doc(
        False, "biases on the query, key and value projections (Qwen2's; exported as Qwen2ForCausalLM)"
    )
    rope_scaling: dict[str, Any] | None = doc(  # noqa: RUF009 (a field; its default is None)
        None,
        "Llama 3.1's rotary frequency scaling: {rope_type: llama3, factor, low_freq_factor, high_freq_factor, "
        "original_max_position_embeddings}; None: unscaled",
        cli=False,
    )
    head_dim: int | None = doc(
        None,
        "width of each attention head; None: n_embd // n_head (Qwen3 0.6B, for one, sets its own, wider)",
        cli=False,
    )
    sliding_window: int | None = doc(
        None,
        "Mistral's attention window, for a model imported from MistralForCausalLM (and exported back as one): "
        "smallm attends within it, so max_seq_len may not exceed it; None: not a Mistral model",
        cli=False,
    )

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            # LLaMA keeps the MLP's parameter count of a 4d GELU MLP with three matrices: 2/3 * 4d.
            self.intermediate_size = -(-8 * self.n_embd // (3 * MLP_MULTIPLE)) * MLP_MULTIPLE
        sizes = ("vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "max_seq_len")
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        elif not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.qkv_bias and self.qk_norm:
            raise ValueError("qkv_bias (Qwen2) and qk_norm (Qwen3) together match no transformers class: choose one")
        if self.sliding_window is not None:
            if self.qkv_bias or self.qk_norm:
                raise ValueError("sliding_window (Mistral) goes with neither qkv_bias (Qwen2) nor qk_norm (Qwen3)")
            if not isinstance(self.sliding_window, int) or self.max_seq_len > self.sliding_window:
                raise ValueError(
                    f"max_seq_len {self.max_seq_len} exceeds the attention window {self.sliding_window!r}: smallm "
                    "runs Mistral models within their window"
                )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The config of preset ``name`` (see :data:`PRESETS`), with any field overridden, e.g. vocab_size."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


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


LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The numbers of a ``rope_type: llama3`` scaling (Llama 3.1 and later)."""


def check_rope_scaling(scaling: dict[str, Any]) -> None:
    """Raises ``ValueError`` naming what is wrong with a rotary scaling (only ``llama3`` is implemented)."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"rope_scaling must be null or of rope_type llama3, got {scaling!r}")
    unknown = sorted(set(scaling) - {"rope_type", *LLAMA3_SCALING})
    missing = [k for k in LLAMA3_SCALING if k not in scaling]
    if unknown or missing:
        raise ValueError(f"rope_scaling (llama3): unknown {unknown}, missing {missing}")
    if not all(isinstance(scaling[k], (int, float)) and scaling[k] > 0 for k in LLAMA3_SCALING):
        raise ValueError(f"rope_scaling (llama3): {', '.join(LLAMA3_SCALING)} must be positive numbers")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("rope_scaling (llama3): high_freq_factor must exceed low_freq_factor")


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
    def grow_vocab(self, vocab_size: int) -> None:
        """Grows the embedding table (and an untied lm_head) to ``vocab_size`` rows, each new row the mean
        of the old ones (as ``transformers``' ``resize_token_embeddings`` starts them: a new token begins as
        an average one, so the old tokens' logits barely move), and sets ``config.vocab_size``."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"the vocabulary only grows: {vocab_size} < {old}")
        if vocab_size == old:
            return

        def grown(weight: Tensor) -> nn.Parameter:
            rows = weight.mean(0, keepdim=True).expand(vocab_size - old, -1)
            return nn.Parameter(torch.cat([weight, rows.to(weight.dtype)]), requires_grad=weight.requires_grad)

        embed = self.model.embed_tokens
        embed.weight = grown(embed.weight)
        embed.num_embeddings = vocab_size
        self.lm_head.weight = embed.weight if self.config.tie_embeddings else grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

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
