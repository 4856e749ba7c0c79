"""Arithmetic for planning a run: parameter and FLOP counts, a training-memory estimate, peak FLOP/s and MFU.

Nothing here builds a model: every number follows from a :class:`~smallm.model.lm.ModelConfig`, so
``smallm-train --dry-run`` can size a 1B model on a laptop. The counts agree with
``SmallLM.num_parameters()`` and ``SmallLM.flops_per_token()`` (the tests check). MFU (model FLOPs
utilisation, PaLM, Chowdhery et al. 2022, appendix B) is the model's training FLOPs per second over the
device's dense peak.

The memory estimate follows what eager PyTorch keeps for :class:`~smallm.model.lm.SmallLM` under the
trainer (:mod:`smallm.train.trainer`): fp32 weights, gradients and AdamW moments; bf16/fp16 by autocast;
the activations autograd saves, counted tensor by tensor in :func:`layer_activation_bytes` (the tests
compare it with the saved tensors of a real forward). torch.compile fuses some of them away, so under
compile the estimate is on the high side.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass

import torch

from smallm.model.config import ModelConfig

__all__ = [
    "GPU_PEAKS",
    "MemoryEstimate",
    "describe_run",
    "estimate_training_memory",
    "flops_per_token",
    "format_bytes",
    "format_count",
    "format_estimate",
    "layer_activation_bytes",
    "matmul_weight_count",
    "measured_peak_flops",
    "mfu",
    "parameter_count",
    "peak_flops",
    "peak_flops_for_name",
    "warn_unknown_device",
]

# ----- peak FLOP/s and MFU ------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuPeak:
    """Dense peak FLOP/s of one GPU model per math mode; None where it has no such tensor cores."""

    label: str
    pattern: str  # searched (case-insensitive) in torch.cuda.get_device_name(); the first match wins
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float  # CUDA cores, without tensor cores: fp32 matmuls with TF32 off


# Source: vendor datasheets, dense (without 2:4 sparsity), per GPU; fp16/bf16 with fp32 accumulation,
# which is what PyTorch uses. GeForce cards: the Ampere GA102 and Ada AD102 whitepapers. A10G: NVIDIA
# publishes no datasheet for it; the figures are AWS's (g5 instances). More specific patterns come first
# (H100 PCIe before H100, A10G before A10) and word boundaries keep "RTX A1000" from matching A100.
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak("H100 PCIe", r"\bH100\b.*\bPCIe\b", 756e12, 756e12, 378e12, 51.2e12),
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", 835e12, 835e12, 418e12, 60e12),
    GpuPeak("H100 SXM", r"\bH100\b", 989e12, 989e12, 495e12, 67e12),
    GpuPeak("GH200", r"\bGH200\b", 989e12, 989e12, 495e12, 67e12),
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", 835e12, 835e12, 418e12, 60e12),
    GpuPeak("H200 SXM", r"\bH200\b", 989e12, 989e12, 495e12, 67e12),
    GpuPeak("A100", r"\bA100\b", 312e12, 312e12, 156e12, 19.5e12),
    GpuPeak("A10G", r"\bA10G\b", 70e12, 70e12, 35e12, 35e12),
    GpuPeak("A10", r"\bA10\b", 125e12, 125e12, 62.5e12, 31.2e12),
    GpuPeak("L40S", r"\bL40S\b", 362e12, 362e12, 183e12, 91.6e12),
    GpuPeak("L4", r"\bL4\b", 121e12, 121e12, 60e12, 30.3e12),
    GpuPeak("RTX 4090", r"\bRTX 4090\b(?! D\b)", 165.2e12, 165.2e12, 82.6e12, 82.6e12),
    GpuPeak("RTX 3090", r"\bRTX 3090\b(?! Ti\b)", 71e12, 71e12, 35.6e12, 35.6e12),
    GpuPeak("V100 PCIe", r"\bV100-PCIE\b", None, 112e12, None, 14e12),
    GpuPeak("V100 SXM2", r"\bV100\b", None, 125e12, None, 15.7e12),
    GpuPeak("T4", r"\bT4\b", None, 65e12, None, 8.1e12),
)

_warned_devices: set[str] = set()


def tf32_enabled() -> bool:
    """Whether fp32 matmuls run on TF32 tensor cores (``torch.set_float32_matmul_precision("high")``)."""
    return torch.get_float32_matmul_precision() != "highest"


def peak_flops_for_name(name: str, dtype: torch.dtype, *, tf32: bool | None = None) -> float | None:
    """Dense peak FLOP/s of the GPU called ``name`` for matmuls in ``dtype``; None if the GPU is not in
    :data:`GPU_PEAKS` or has no tensor cores for ``dtype`` (bf16 before Ampere). fp32 counts as TF32
    when ``tf32`` (default: PyTorch's current setting) and the GPU has TF32."""
    entry = next((e for e in GPU_PEAKS if re.search(e.pattern, name, flags=re.IGNORECASE)), None)
    if entry is None:
        return None
    if dtype == torch.bfloat16:
        return entry.bf16
    if dtype == torch.float16:
        return entry.fp16
    if dtype == torch.float32:
        use_tf32 = tf32_enabled() if tf32 is None else tf32
        return entry.tf32 if use_tf32 and entry.tf32 is not None else entry.fp32
    return None


def peak_flops(device: torch.device | str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` for matmuls in ``dtype`` (the autocast dtype, or float32).

    None for the CPU (which has no datasheet figure here: :func:`measured_peak_flops` measures one) and for
    GPUs not in :data:`GPU_PEAKS`: then report no MFU, and say why once with :func:`warn_unknown_device`."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device), dtype)


@functools.lru_cache(maxsize=8)
def measured_peak_flops(dtype: torch.dtype = torch.float32, threads: int | None = None) -> float:
    """The CPU's matmul peak as torch reaches it: the best FLOP/s of square ``dtype`` matmuls of 1024 and
    2048 rows (two timed each, after one to warm up) on ``threads`` threads (torch's setting). Measured once
    per process and setting (about half a second); MFU on the CPU is reported against it."""
    import time

    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for n in (1024, 2048):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            a @ b
            for _ in range(2):
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * n**3 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous)
    return best


def warn_unknown_device(name: str) -> None:
    """Warns, once per device name, that MFU cannot be reported because its peak is not known."""
    if name in _warned_devices:
        return
    _warned_devices.add(name)
    warnings.warn(
        f"peak FLOP/s of {name!r} not known (smallm.train.memory.GPU_PEAKS): MFU will not be reported",
        stacklevel=2,
    )


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak; None without a peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_token * tokens_per_second / peak


# ----- parameter and FLOP counts ------------------------------------------------------------------


def matmul_weight_count(config: ModelConfig) -> int:
    """Elements of every linear layer's weight: each block's seven projections and lm_head (counted
    even when tied to the embedding, since the matmul still happens)."""
    per_layer = sum(rows * cols for rows, cols in config.projections().values())
    return config.n_layer * per_layer + config.vocab_size * config.n_embd


def parameter_count(config: ModelConfig, exclude_embeddings: bool = False) -> int:
    """``SmallLM(config).num_parameters(exclude_embeddings)`` without building the model."""
    embedding = config.vocab_size * config.n_embd
    norms = (2 * config.n_layer + 1) * config.n_embd + (2 * config.n_layer * config.head_dim if config.qk_norm else 0)
    total = matmul_weight_count(config) + norms + (0 if config.tie_embeddings else embedding)
    return total - embedding if exclude_embeddings else total


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """``SmallLM(config).flops_per_token(seq_len)``: 6 x matmul weights + 12 x layers x width x seq_len."""
    T = config.max_seq_len if seq_len is None else seq_len
    return 6 * matmul_weight_count(config) + 12 * config.n_layer * config.n_embd * T


# ----- training memory ----------------------------------------------------------------------------

ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes of a matmul input/output element
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "muon": 1, "lion": 1, "sgd": 1}  # fp32 tensors per parameter
LOGIT_BYTES = 12  # 3 fp32 tensors of B x T x vocab at the peak; see estimate_training_memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU that one training step needs, by what holds them."""

    parameters: int
    gradients: int
    optimizer_state: int
    weight_copies: int  # autocast's bf16/fp16 copies of the matmul weights
    activations: int  # saved for backward, without the logits
    logits: int
    precision: str
    activation_checkpointing: bool
    optimizer: str
    batch_size: int
    seq_len: int
    vocab_size: int
    n_layer: int
    world_size: int
    fsdp: bool

    @property
    def total(self) -> int:
        """The sum of the parts: an upper bound on the peak, reached closely at the start of backward
        when gradients from an earlier micro-batch are still held (gradient accumulation)."""
        parts = (self.parameters, self.gradients, self.optimizer_state, self.weight_copies)
        return sum(parts) + self.activations + self.logits


def layer_activation_bytes(
    config: ModelConfig, batch_size: int, seq_len: int, precision: str, attention: str = "flash"
) -> int:
    """Bytes one decoder block saves for backward in eager mode, tensor by tensor (N = B x T tokens,
    d = n_embd, kv = n_kv_head x head_dim, I = intermediate_size, e = 2 under bf16/fp16 autocast, else 4):

    * the residual stream stays fp32 even under autocast (the fp32 embedding plus a bf16 branch is
      fp32): the block input and the sum after attention, 2 x 4Nd;
    * each RMSNorm (fp32): the normalised x and its 1/rms, 4Nd + 4N, twice;
    * the inputs of the projections: in fp32 the two norm outputs, 2 x 4Nd; under autocast each of
      q, k, v, gate and up casts its own bf16 copy of its input (autocast caches casts of weights only),
      5 x eNd;
    * attention, ``"flash"`` (the flash or memory-efficient SDPA kernels, CPU included): q, k, v and the
      output, e(2Nq + 2N kv) with q = n_head x head_dim (d unless the heads are set wider), and the fp32
      log-sum-exp, 4 x B x n_head x T; no T x T matrix.
      ``"math"`` (SDPA's fallback, e.g. with an attention mask or without a fused kernel for GQA):
      the softmax probabilities, 4 x B x n_head x T^2, and q, k, v (k, v repeated to n_head heads) in
      fp32 (the math kernel upcasts bf16), 3 x 4Nd, plus the output, eNd;
    * the SwiGLU MLP: gate, silu(gate), up and their product, 4 x eNI.

    RoPE saves nothing per block: its cos/sin need no gradient and are shared by all blocks.
    """
    if attention not in ("flash", "math"):
        raise ValueError(f"attention must be flash or math, got {attention!r}")
    e = _activation_bytes(precision)
    B, T, N = batch_size, seq_len, batch_size * seq_len
    d, kv, inner = config.n_embd, config.n_kv_head * config.head_dim, config.intermediate_size
    residual = 2 * 4 * N * d
    norms = 2 * (4 * N * d + 4 * N)
    projection_inputs = 2 * 4 * N * d if e == 4 else 5 * e * N * d
    if attention == "flash":
        attn = e * N * (2 * config.n_head * config.head_dim + 2 * kv) + 4 * B * config.n_head * T
    else:
        attn = 4 * B * config.n_head * T * T + 3 * 4 * N * d + e * N * d
    mlp = 4 * e * N * inner
    return residual + norms + projection_inputs + attn + mlp


def estimate_training_memory(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    *,
    precision: str,
    activation_checkpointing: bool,
    optimizer: str = "adamw",
    world_size: int = 1,
    fsdp: bool = False,
    attention: str = "flash",
) -> MemoryEstimate:
    """Bytes per GPU for a training step of ``batch_size`` sequences of ``seq_len`` tokens per GPU.

    * Parameters and gradients are fp32 at every ``precision``: the trainer runs autocast over fp32
      weights, so fp32 weights double as the master copy. Under DDP (``world_size`` > 1, not ``fsdp``)
      the gradient buckets hold a second copy of the gradients.
    * Optimizer state: fp32 tensors per parameter, 2 for AdamW (both moments); ``muon``: one (the
      momentum) for the block matrices, AdamW's two for the embeddings and norms.
    * Weight copies: under bf16/fp16, autocast's casts of the matmul weights (2 bytes each), held in
      its cache until the forward ends (and, without checkpointing, saved for backward). Not divided
      by FSDP (the casts are of the gathered weights), which makes this term pessimistic there.
    * Activations: :func:`layer_activation_bytes` per block, plus the final norm (3 x 4Nd or
      2 x 4Nd + 2Nd), lm_head's input cast, the RoPE tables and the int64 ids and targets. With
      ``activation_checkpointing`` each block keeps only its fp32 input (4Nd) and one block's
      activations exist at a time, recomputed in backward.
    * Logits: B x T x vocab x 12 bytes, three fp32 tensors of that size when the loss's backward runs:
      the log-softmax cross_entropy saves, the gradient coming into it and the one it returns (the trainer
      keeps no reference to the logits themselves, freed once the loss is computed). For small models with
      a large vocabulary this is often the biggest item.
    * ``fsdp``: parameters, gradients and optimizer state divided by ``world_size`` (FSDP2's
      transient all-gather buffers of one block are left out).

    Not counted: the CUDA context (a few hundred MiB), the allocator's fragmentation and cuBLAS/compile
    workspaces.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch_size < 1 or seq_len < 1 or world_size < 1:
        raise ValueError("batch_size, seq_len and world_size must be at least 1")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    e = _activation_bytes(precision)
    n_params = parameter_count(config)
    shards = world_size if fsdp else 1
    ddp_buckets = 2 if world_size > 1 and not fsdp else 1
    N, d = batch_size * seq_len, config.n_embd
    per_layer = layer_activation_bytes(config, batch_size, seq_len, precision, attention)
    # Checkpointed, a block keeps only its fp32 input, and one block's activations are recomputed at a time.
    blocks = config.n_layer * 4 * N * d + per_layer if activation_checkpointing else config.n_layer * per_layer
    final_norm = 2 * 4 * N * d + 4 * N
    head_input = e * N * d  # the final norm's output in fp32, or lm_head's cast of it
    rope = 2 * seq_len * config.head_dim * 4
    ids = 2 * 8 * N
    return MemoryEstimate(
        parameters=4 * n_params // shards,
        gradients=ddp_buckets * 4 * n_params // shards,
        optimizer_state=_optimizer_state_bytes(config, optimizer, n_params) // shards,
        weight_copies=0 if e == 4 else e * matmul_weight_count(config),
        activations=blocks + final_norm + head_input + rope + ids,
        logits=LOGIT_BYTES * N * config.vocab_size,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        optimizer=optimizer,
        batch_size=batch_size,
        seq_len=seq_len,
        vocab_size=config.vocab_size,
        n_layer=config.n_layer,
        world_size=world_size,
        fsdp=fsdp,
    )


def _optimizer_state_bytes(config: ModelConfig, optimizer: str, n_params: int) -> int:
    if optimizer != "muon":
        return OPTIMIZER_STATES[optimizer] * 4 * n_params
    matrices = matmul_weight_count(config) - config.vocab_size * config.n_embd  # lm_head takes AdamW
    return 4 * (matrices + 2 * (n_params - matrices))


def _activation_bytes(precision: str) -> int:
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
    return ACTIVATION_BYTES[precision]


# ----- reports ------------------------------------------------------------------------------------


def _state_count(optimizer: str) -> str:
    return "1 (matrices) or 2" if optimizer == "muon" else str(OPTIMIZER_STATES[optimizer])


def format_bytes(n: float) -> str:
    """``n`` bytes as MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def format_count(n: float) -> str:
    """A count in K, M or B with three significant digits: 38.3M, 1.10B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            x = n / scale
            return f"{x:.2f}{suffix}" if x < 10 else f"{x:.1f}{suffix}" if x < 100 else f"{x:.0f}{suffix}"
    return str(int(n))


def _memory_rows(est: MemoryEstimate) -> list[tuple[str, int]]:
    sharded = f", sharded / {est.world_size}" if est.fsdp else ""
    grads = ", x2 for DDP buckets" if est.world_size > 1 and not est.fsdp else sharded
    rows = [
        (f"parameters (fp32{sharded})", est.parameters),
        (f"gradients (fp32{grads})", est.gradients),
        (f"optimizer state ({est.optimizer}, {_state_count(est.optimizer)} x fp32{sharded})", est.optimizer_state),
    ]
    if est.weight_copies:
        rows.append((f"{est.precision} weight copies (autocast)", est.weight_copies))
    rows.append((f"activations ({est.n_layer} blocks)", est.activations))
    rows.append((f"logits ({est.batch_size} x {est.seq_len} x {est.vocab_size}, fp32)", est.logits))
    return rows


def _table(labels: list[str], columns: list[list[int]], headers: list[str]) -> str:
    width = max(len(label) for label in [*labels, "total"])
    lines = ["| " + " | ".join(["item".ljust(width), *(h.rjust(12) for h in headers)]) + " |"]
    lines.append("|" + "-" * (width + 2) + "|" + "|".join("-" * (max(12, len(h)) + 1) + ":" for h in headers) + "|")
    for i, label in enumerate([*labels, "total"]):
        cells = [format_bytes(col[i]).rjust(max(12, len(h))) for col, h in zip(columns, headers)]
        lines.append("| " + " | ".join([label.ljust(width), *cells]) + " |")
    return "\n".join(lines)


def format_estimate(est: MemoryEstimate) -> str:
    """A readable table of ``est``, one row per item and the total, in MiB or GiB."""
    rows = _memory_rows(est)
    header = "with checkpointing" if est.activation_checkpointing else "no checkpointing"
    return _table([r[0] for r in rows], [[r[1] for r in rows] + [est.total]], [header])


def describe_run(
    config: ModelConfig,
    batch_size: int,
    seq_len: int,
    precision: str,
    world_size: int = 1,
    fsdp: bool = False,
    optimizer: str = "adamw",
    step_tokens: int | None = None,
) -> str:
    """What ``smallm-train --dry-run`` prints: parameter counts, FLOPs per token and per optimizer step
    of ``step_tokens`` (default: one micro-batch on every rank), and the memory per GPU without and
    with activation checkpointing."""
    kw = dict(precision=precision, world_size=world_size, fsdp=fsdp, optimizer=optimizer)
    plain = estimate_training_memory(config, batch_size, seq_len, activation_checkpointing=False, **kw)
    ckpt = estimate_training_memory(config, batch_size, seq_len, activation_checkpointing=True, **kw)
    n, n_body = parameter_count(config), parameter_count(config, exclude_embeddings=True)
    fpt = flops_per_token(config, seq_len)
    step_tokens = step_tokens or batch_size * seq_len * world_size
    mode = "fp32" if precision == "fp32" else f"{precision} autocast over fp32 weights"
    parallel = f"{world_size} GPUs, {'FSDP' if fsdp else 'DDP'}" if world_size > 1 else "1 device"
    tied = "tied to lm_head" if config.tie_embeddings else "lm_head untied"
    rows = _memory_rows(plain)
    columns = [[r[1] for r in rows] + [plain.total], [r[1] for r in _memory_rows(ckpt)] + [ckpt.total]]
    return "\n".join(
        [
            f"model: {format_count(n)} parameters ({n:,}), {format_count(n_body)} without the embedding "
            f"table ({tied}); {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads "
            f"({config.n_kv_head} kv), MLP {config.intermediate_size}, vocab {config.vocab_size}",
            f"training FLOPs: {fpt:.3g} per token at seq_len {seq_len} (6 x matmul weights + attention), "
            f"{fpt * step_tokens:.3g} per step of {step_tokens:,} tokens",
            f"memory per GPU: {mode}, {optimizer}, micro-batch {batch_size} x {seq_len}, {parallel}",
            "",
            _table([r[0] for r in rows], columns, ["no checkpointing", "with checkpointing"]),
            "",
            "total: the sum of the items, an upper bound on the peak; the CUDA context (~0.5 GiB) and "
            "allocator fragmentation come on top. torch.compile usually needs less activation memory.",
        ]
    )
