"""A model's shape: :class:`ModelConfig`, its checks, and the presets.

The fields are those of Hugging Face's LLaMA configs under smallm's names (``n_embd`` for ``hidden_size``...);
:mod:`smallm.interop.hf_export` and :mod:`smallm.interop.hf_import` map them. A preset names a shape;
any field can be overridden (``ModelConfig.preset("tiny", vocab_size=8192)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from smallm.options import doc

__all__ = ["ACTIVATIONS", "LLAMA3_SCALING", "PRESETS", "ModelConfig", "check_rope_scaling", "padded_vocab"]

MLP_MULTIPLE = 256  # the default intermediate size is rounded up to this, for matmul-friendly shapes
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}
"""The MLP activations, by the names transformers' ``hidden_act`` gives them (so exports stay exact)."""

LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
"""The numbers of a ``rope_type: llama3`` scaling (Llama 3.1 and later)."""


def padded_vocab(size: int) -> int:
    """Embedding rows for a tokenizer of ``size`` ids: rounded up to a multiple of 64 (faster matmuls)."""
    return -(-size // 64) * 64


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

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each linear layer of a block by its name: (input width, output width)."""
        d, q, kv, inner = (
            self.n_embd,
            self.n_head * self.head_dim,
            self.n_kv_head * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, inner), "up_proj": (d, inner), "down_proj": (inner, d),
        }  # fmt: skip

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """The config of preset ``name`` (see :data:`PRESETS`), with any field overridden, e.g. vocab_size."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
