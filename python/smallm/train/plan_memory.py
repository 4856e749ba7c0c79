"""Memory and FLOPs of one training step of any kind of run, from the shapes alone: pretraining, SFT, DPO and
the reward model, each in full, with LoRA or with QLoRA, with or without activation checkpointing.

:func:`estimate_step` turns a :class:`~smallm.model.config.ModelConfig` and a :class:`StepShape` into a
:class:`StepEstimate`: what holds memory, item by item, the peak those items make, the parameters trained and
the FLOPs the step runs. It follows what the trainer (:mod:`smallm.train.trainer`) and the model parts
(:mod:`smallm.train.trainable`) keep:

* **weights**: trained weights are fp32 (autocast reads them through casts); a LoRA base is frozen in the
  autocast dtype (fp32 without autocast); QLoRA's block projections are NF4 (4 bits, one int8 scale per 64
  weights and one fp32 factor per 256 scales), the rest of its base as LoRA's.
* **adapters**, and the weights trained in full beside them (``--lora-train-embeddings``; the reward
  model's score head): fp32.
* **gradients** and **optimizer state** of the trained parameters only (AdamW: two fp32 moments).
* **weight copies**: autocast's bf16/fp16 casts of the fp32 matrices it multiplies (none for a frozen
  base already in that dtype).
* **DPO's reference**: a frozen copy of the model in the autocast dtype (fp32 without) for full DPO; none
  under LoRA, where the reference is the same network with its adapters disabled.
* **activations** of B rows (DPO and the reward model: 2B, the chosen and the rejected answers) as
  :func:`smallm.train.memory.layer_activation_bytes` counts them, plus LoRA's own (each adapter keeps its
  rank-r intermediate).
* **NF4 dequantization** (QLoRA): a quantized weight is dequantized where it is used, with a transposed
  copy, one matrix at a time: twice the largest projection in the frozen dtype, held at the peak.
* **logits**: 12 bytes per row, position and vocabulary entry at the loss's backward (the fp32
  log-softmax it saved, the gradient coming into it and the one it returns); DPO's reference forward, under
  ``no_grad``, needs as much while the policy's log-softmax is held. The reward model computes none: its
  head reads one position.

The peak is the larger of two moments: the start of the backward (persistent memory, activations, logits and
the gradients present then: all of them when a step accumulates several micro-batches, else those of the
output head, the first the backward computes; under checkpointing the larger of that, without the block
recomputed later, and the recomputation, after the logits are freed) and the optimizer step (persistent
memory and every gradient).
Not counted: the CUDA context, the allocator's fragmentation, cuBLAS and compile workspaces, and the
kernels' own temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from smallm.model.config import ModelConfig
from smallm.model.lora import LINEAR_TARGETS
from smallm.train.memory import (
    ACTIVATION_BYTES,
    LOGIT_BYTES,
    OPTIMIZER_STATES,
    estimate_training_memory,
    format_bytes,
    layer_activation_bytes,
    matmul_weight_count,
    parameter_count,
)

__all__ = ["KINDS", "MODES", "NF4_BYTES", "StepEstimate", "StepShape", "estimate_step", "lora_parameters"]

KINDS = ("pretrain", "sft", "dpo", "rm")
MODES = ("full", "lora", "qlora")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
"""Bytes per NF4 weight: 4 bits, an int8 scale per block of 64, an fp32 factor per 256 scales."""
NF4_MULTIPLE = 64 * 256  # a matrix whose size is not a multiple of this stays unquantized (smallm.model.lora)


@dataclass(frozen=True)
class StepShape:
    """What a step of a run is, besides the model's shape."""

    kind: str = "sft"  # one of KINDS
    mode: str = "full"  # one of MODES
    batch_size: int = 8  # rows (pairs for dpo and rm) per micro-batch
    seq_len: int = 256
    micro_batches: int = 1  # per optimizer step (gradient accumulation)
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast over fp32 weights)
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    lora_r: int = 0
    lora_targets: tuple[str, ...] = LINEAR_TARGETS
    train_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.mode not in MODES:
            raise ValueError(f"kind must be one of {KINDS} and mode one of {MODES}, got {self.kind!r}, {self.mode!r}")
        if self.mode != "full" and self.lora_r < 1:
            raise ValueError(f"a {self.mode} step needs lora_r >= 1")

    @property
    def rows(self) -> int:
        """Sequences in one micro-batch's forward: a pair is two."""
        return 2 * self.batch_size if self.kind in ("dpo", "rm") else self.batch_size

    @property
    def tokens(self) -> int:
        """Tokens one micro-batch feeds the model."""
        return self.rows * self.seq_len


@dataclass(frozen=True)
class StepEstimate:
    """Bytes by item, the peak, the trained parameters and the FLOPs of one optimizer step."""

    items: tuple[tuple[str, int], ...]
    persistent: int  # weights, adapters, optimizer state, the reference: held from step to step
    forward_peak: int
    optimizer_peak: int
    parameters: int
    trained: int
    flops_per_step: float  # what runs, recomputation and DPO's reference forward included
    model_flops_per_step: float  # the training FLOPs MFU counts: 6 per trained-through weight and token

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.optimizer_peak)

    def table(self) -> str:
        """The items and the peak as a markdown table."""
        width = max(len(label) for label, _ in self.items)
        lines = [f"| {'item'.ljust(width)} | {'bytes'.rjust(11)} |", f"|{'-' * (width + 2)}|{'-' * 12}:|"]
        lines += [f"| {label.ljust(width)} | {format_bytes(n).rjust(11)} |" for label, n in self.items]
        lines.append(f"| {'peak (estimated)'.ljust(width)} | {format_bytes(self.peak).rjust(11)} |")
        return "\n".join(lines)


def lora_parameters(config: ModelConfig, r: int, targets: tuple[str, ...]) -> int:
    """Parameters of rank-``r`` adapters on ``targets`` of every block: r x (inputs + outputs) each."""
    shapes = config.projections()
    return config.n_layer * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def estimate_step(config: ModelConfig, shape: StepShape) -> StepEstimate:
    """The memory and FLOPs of one optimizer step of ``shape`` on a model of ``config``; see the module
    docstring for what each item counts."""
    e = ACTIVATION_BYTES[shape.precision]
    n_params = parameter_count(config)
    embedding = config.vocab_size * config.n_embd
    head = 0 if config.tie_embeddings else embedding  # an untied lm_head
    score = config.n_embd if shape.kind == "rm" else 0
    matrices = config.n_layer * sum(i * o for i, o in config.projections().values())
    items: list[tuple[str, int]] = []
    if shape.mode == "full":
        # The reward model leaves an untied lm_head frozen (unused), but in fp32 with the rest.
        trained = n_params + score - (head if shape.kind == "rm" else 0)
        items.append(("weights (fp32)", 4 * (n_params + score)))
        adapters = 0
    else:
        adapters = lora_parameters(config, shape.lora_r, shape.lora_targets)
        full = (embedding + (head if shape.kind != "rm" else 0)) if shape.train_embeddings else 0
        trained = adapters + full + score
        frozen = n_params - full
        label = "fp32" if e == 4 else shape.precision
        if shape.mode == "qlora":
            quantized = _nf4_weights(config)
            items.append(("frozen block projections (NF4)", int(NF4_BYTES * quantized)))
            items.append((f"frozen rest of the base ({label})", e * (frozen - quantized)))
        else:
            items.append((f"frozen base ({label})", e * frozen))
        items.append((f"LoRA adapters r={shape.lora_r} (fp32)", 4 * adapters))
        if full + score:
            items.append(("weights trained in full beside them (fp32)", 4 * (full + score)))
    gradients = 4 * trained
    optimizer = _optimizer_bytes(shape.optimizer, trained, adapters if shape.mode != "full" else matrices)
    items.append(("gradients (fp32)", gradients))
    items.append((f"optimizer state ({shape.optimizer})", optimizer))
    used = matmul_weight_count(config) - (embedding if shape.kind == "rm" else 0)  # rm: no lm_head matmul
    copies = (e * used if shape.mode == "full" else e * adapters) if e == 2 else 0
    if copies:
        items.append((f"{shape.precision} weight copies (autocast)", copies))
    reference = e * n_params if shape.kind == "dpo" and shape.mode == "full" else 0
    if reference:
        items.append(("DPO's reference model (frozen copy)", reference))
    activations = _activations(config, shape)
    items.append((f"activations ({config.n_layer} blocks, {shape.rows} x {shape.seq_len})", activations))
    logits = 0 if shape.kind == "rm" else LOGIT_BYTES * shape.tokens * config.vocab_size
    if logits:
        items.append((f"logits and their gradient ({shape.rows} x {shape.seq_len} x {config.vocab_size})", logits))
    # QLoRA dequantizes each NF4 weight when it is used: the weight and a transposed copy, one matrix at a time.
    dequantized = 2 * e * max(i * o for i, o in config.projections().values()) if shape.mode == "qlora" else 0
    if dequantized:
        items.append(("NF4 weights dequantized for a matmul (transient)", dequantized))
    transient = ("gradients", "activations", "logits", "NF4 weights")
    persistent = sum(n for label, n in items if not label.startswith(transient))
    persistent -= copies  # the casts live from the forward to the backward
    early_grads = gradients if shape.micro_batches > 1 else min(gradients, 4 * (head or embedding))
    # Checkpointed, the block recomputed in the backward comes after the logits' memory is freed, while the
    # gradient of its output and of its input are held (4 bytes a width each).
    recomputed = _block(config, shape) if shape.activation_checkpointing else 0
    at_loss = activations - recomputed + logits
    in_block = activations + (2 * 4 * shape.tokens * config.n_embd if recomputed else 0)
    flops = _step_flops(config, shape, used, adapters)
    return StepEstimate(
        items=tuple(items),
        persistent=persistent,
        forward_peak=persistent + copies + max(at_loss, in_block) + early_grads + dequantized,
        optimizer_peak=persistent + gradients,
        parameters=n_params + score,
        trained=trained,
        flops_per_step=flops[0],
        model_flops_per_step=flops[1],
    )


def _nf4_weights(config: ModelConfig) -> int:
    """Block projection weights QLoRA stores as NF4 (the others stay in the frozen dtype)."""
    sizes = [i * o for i, o in config.projections().values()]
    return config.n_layer * sum(n for n in sizes if n % NF4_MULTIPLE == 0)


def _optimizer_bytes(optimizer: str, trained: int, matrices: int) -> int:
    name = {"paged-adamw": "adamw"}.get(optimizer, optimizer)
    if name not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    if name == "muon":  # one momentum for the block matrices, AdamW's two for the rest
        matrices = min(matrices, trained)
        return 4 * (matrices + 2 * (trained - matrices))
    return OPTIMIZER_STATES[name] * 4 * trained


def _activations(config: ModelConfig, shape: StepShape) -> int:
    """What the forward of one micro-batch saves for backward, without the logits."""
    est = estimate_training_memory(
        replace(config, max_seq_len=max(config.max_seq_len, shape.seq_len)), shape.rows, shape.seq_len,
        precision=shape.precision, activation_checkpointing=shape.activation_checkpointing,
    )  # fmt: skip
    if shape.mode == "full":
        return est.activations
    # Frozen norm gains: a norm keeps no normalised copy of its input for their gradient; each adapter keeps
    # its rank-r intermediate.
    e = ACTIVATION_BYTES[shape.precision]
    blocks = 1 if shape.activation_checkpointing else config.n_layer
    norms = (2 * blocks + 1) * 4 * shape.tokens * config.n_embd
    return est.activations - norms + blocks * len(shape.lora_targets) * e * shape.tokens * shape.lora_r


def _block(config: ModelConfig, shape: StepShape) -> int:
    """What one block saves (recomputed there, under checkpointing)."""
    return layer_activation_bytes(config, shape.rows, shape.seq_len, shape.precision)


def _step_flops(config: ModelConfig, shape: StepShape, used: int, adapters: int) -> tuple[float, float]:
    """(FLOPs the step runs, model FLOPs) over its micro-batches. A forward costs 2 per weight and token plus
    attention's 4 x layers x width x positions; the backward twice that for trained weights, once for frozen
    ones (only the gradient of their input); checkpointing runs the blocks' forward again; DPO adds the
    reference's forward."""
    tokens = shape.tokens * shape.micro_batches
    attention = 4 * config.n_layer * config.n_embd * shape.seq_len
    forward = 2 * used + attention + (2 * adapters if shape.mode != "full" else 0)
    blocks = 2 * (used - config.vocab_size * config.n_embd * (shape.kind != "rm")) + attention
    # Input gradients through everything; weight gradients of what trains (all of it, or the adapters).
    backward = 2 * forward if shape.mode == "full" else forward + 2 * (2 * adapters)
    run = forward + backward + (blocks if shape.activation_checkpointing else 0)
    run += forward if shape.kind == "dpo" else 0
    return float(run * tokens), float((forward + backward) * tokens)
