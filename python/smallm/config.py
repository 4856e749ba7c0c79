"""Run configuration: what every kind of training run shares, and what pretraining, SFT and DPO add.

:class:`RunConfig` holds the fields all runs share (output, steps, batch, optimisation, precision,
parallelism, evaluation, checkpoints, logging, the end-of-run sample); :class:`TrainConfig`
(``smallm-train``), :class:`FinetuneConfig` (``smallm-sft``) and :class:`DPOConfig` (``smallm-dpo``) add
only what their kind of run uses, so a command offers no flag it would ignore. Each field is declared
once with its help and allowed values (:func:`smallm.options.doc`); :func:`validate` is the one check
every configuration goes through, field constraints first, then the rules that tie fields together.

Precedence: dataclass defaults < a TOML or JSON config file < command-line flags. The model's shape
(pretraining) comes from a preset and can be changed field by field with ``--model-<field>`` flags or a
``[model]`` table in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from smallm.lora import LoraSettings
from smallm.model import PRESETS
from smallm.options import check_fields, doc, from_mapping, redefault

__all__ = ["PRESET_LR", "DPOConfig", "FinetuneConfig", "RunConfig", "TrainConfig", "build_config", "validate"]

PRESET_LR = {"tiny": 3e-3, "38m": 1.5e-3, "124m": 6e-4, "350m": 3e-4, "tinyllama-1.1b": 4e-4}
"""Peak pretraining learning rates that suit each preset (smaller models take larger steps)."""
FINETUNE_LR = {("sft", False): 2e-5, ("sft", True): 2e-4, ("dpo", False): 1e-6, ("dpo", True): 2e-5}
"""Peak fine-tuning learning rates by (method, LoRA): adapters start from zero and take larger steps."""
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("auto", "adamw", "paged-adamw")


@dataclass
class RunConfig:
    """What every training run shares: output, steps, batches, optimisation, precision, parallelism,
    evaluation, checkpoints, logging and the sample generated at the end."""

    out: str = doc("runs/smallm", "run directory for checkpoints, metrics.jsonl, config and plots")
    max_steps: int = doc(300, "optimizer steps to train for", minimum=0)
    batch_size: int = doc(8, "sequences per micro-batch on each device", minimum=1)
    seq_len: int | None = doc(None, "tokens per sequence (default: the model's context)", minimum=1)
    grad_accum: int = doc(1, "micro-batches per optimizer step", minimum=1)
    lr: float | None = doc(
        None, "peak learning rate (default: the preset's in pretraining, the method's in fine-tuning)"
    )
    min_lr_ratio: float = doc(0.1, "the cosine decay ends at this fraction of the peak", minimum=0, maximum=1)
    warmup_steps: int = doc(30, "steps of linear warm-up from 0 to the peak", minimum=0)
    weight_decay: float = doc(0.1, "AdamW weight decay, applied to 2-D weights only", minimum=0)
    beta1: float = doc(0.9, "AdamW beta1", minimum=0, below=1)
    beta2: float = doc(0.95, "AdamW beta2", minimum=0, below=1)
    optimizer: str = doc(
        "auto", "adamw, paged-adamw (bitsandbytes, CUDA) or auto (paged under QLoRA on CUDA)", choices=OPTIMIZERS
    )
    grad_clip: float = doc(1.0, "clip the global gradient norm to this (0: off)", minimum=0)
    precision: str = doc(
        "auto", "auto (bf16 if supported, else fp16 on CUDA, fp32 on CPU), bf16, fp16, fp32", choices=PRECISIONS
    )
    compile: bool = doc(False, "torch.compile the model (falls back with a warning where it cannot)")
    activation_checkpointing: bool = doc(False, "recompute block activations in the backward pass")
    fsdp: bool = doc(False, "shard parameters with FSDP2 instead of DDP under torchrun")
    device: str = doc("auto", "cpu, cuda, cuda:N or auto")
    seed: int = doc(1337, "seed for initialisation and data order", minimum=0)
    log_every: int = doc(10, "steps between metric lines", minimum=1)
    eval_every: int = doc(100, "steps between validation passes (0: only at the end)", minimum=0)
    eval_batches: int = doc(0, "validation batches per pass (0: the whole split)", minimum=0)
    checkpoint_every: int = doc(100, "steps between checkpoints (the last step is always saved)", minimum=1)
    keep_last: int = doc(3, "checkpoints kept besides the best one", minimum=1)
    resume: bool = doc(False, "continue from the latest checkpoint in --out")
    tensorboard: bool = doc(False, "also log to TensorBoard (needs the tensorboard package)")
    wandb_project: str | None = doc(None, "also log to this Weights & Biases project (needs wandb)")
    sample_prompt: str = doc("", "prompt of the sample generated at the end")
    sample_tokens: int = doc(120, "tokens in the sample generated at the end", minimum=1)

    def peak_lr(self) -> float:
        """The learning rate to use: ``lr``, else the kind of run's default."""
        raise NotImplementedError


@dataclass
class TrainConfig(RunConfig):
    """Pretraining (``smallm-train``): shards, a model preset (or the weights to start from)."""

    data: str | None = doc(None, "shard directory from smallm-tokenize (default: built-in stdlib corpus)")
    preset: str = doc("tiny", "model preset", choices=tuple(PRESETS))
    sampling: str = doc(
        "random",
        "training rows: random windows, or documents (rows start at a document)",
        choices=("random", "documents"),
    )
    init_from: str | None = doc(
        None,
        "start from these weights (a run, checkpoint or smallm-import directory) with a fresh optimizer; "
        "the model shape comes from there",
    )
    dry_run: bool = doc(False, "print parameters, FLOPs and memory estimates, then exit")
    model: dict[str, Any] = doc(dict, "overrides of the preset's ModelConfig fields", cli=False)  # noqa: RUF009 (a field)

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else PRESET_LR.get(self.preset, 6e-4)


@dataclass
class FinetuneConfig(RunConfig):
    """Supervised fine-tuning (``smallm-sft``) of a checkpoint on conversations, in full or with LoRA."""

    method: ClassVar[str] = "sft"

    out: str = redefault(RunConfig, "out", "runs/finetune")
    max_steps: int = redefault(RunConfig, "max_steps", 0)
    warmup_steps: int = redefault(RunConfig, "warmup_steps", 10)
    weight_decay: float = redefault(RunConfig, "weight_decay", 0.0)
    init_from: str | None = doc(None, "the checkpoint to fine-tune (the command's CKPT)", cli=False)
    data: str | None = doc(None, "JSON Lines file: conversations (smallm-sft) or preference pairs (smallm-dpo)")
    val_data: str | None = doc(None, "validation file in the same format (default: hold out --val-fraction)")
    val_fraction: float = doc(
        0.05, "share of the data held out for validation when no --val-data (0: none)", minimum=0, below=1
    )
    epochs: float = doc(1.0, "passes over the training data when --max-steps is 0", minimum=0)
    lora_r: int = doc(0, "LoRA rank (0: full fine-tuning of every weight)", minimum=0)
    lora_alpha: float | None = doc(None, "LoRA scale numerator: updates are scaled by alpha / r (default: 2 * r)")
    lora_dropout: float = doc(
        0.0, "dropout on the LoRA input (costs a random mask per adapted layer and step)", minimum=0, below=1
    )
    lora_targets: str = doc("all-linear", "layers given adapters: all-linear, or a list like q_proj,v_proj")
    lora_train_embeddings: bool = doc(
        False,
        "LoRA: also train the embedding table and lm_head in full (small or briefly trained bases need it; "
        "the run is then merged with smallm-merge rather than applied as a peft adapter)",
    )
    quantize: str = doc(
        "none", "none, or nf4: QLoRA, the frozen base in 4-bit NF4 (needs --lora-r)", choices=("none", "nf4")
    )

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else FINETUNE_LR[(self.method, self.lora_r > 0)]

    def lora(self) -> LoraSettings | None:
        """The adapters to train, or None for full fine-tuning."""
        if self.lora_r == 0:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r
        return LoraSettings(self.lora_r, alpha, self.lora_dropout, LoraSettings.parse_targets(self.lora_targets))


@dataclass
class DPOConfig(FinetuneConfig):
    """Direct preference optimization (``smallm-dpo``) of a checkpoint on preference pairs."""

    method: ClassVar[str] = "dpo"

    beta: float = doc(0.1, "strength of the pull towards the reference model (the starting weights)")


def validate(cfg: RunConfig) -> None:
    """Raises ``ValueError`` naming the first setting of ``cfg`` that is out of range or that contradicts
    another. Every kind of run's configuration goes through here."""
    check_fields(cfg)
    if not cfg.peak_lr() > 0:
        raise ValueError(f"lr must be positive, got {cfg.peak_lr()}")
    if isinstance(cfg, TrainConfig) and cfg.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {cfg.max_steps}")
    if isinstance(cfg, FinetuneConfig):
        _validate_finetuning(cfg)


def _validate_finetuning(cfg: FinetuneConfig) -> None:
    if cfg.max_steps == 0 and not cfg.epochs > 0:
        raise ValueError("max_steps must be positive, or 0 with a positive --epochs")
    if not cfg.init_from:
        raise ValueError("fine-tuning starts from a checkpoint: give CKPT (a run or checkpoint directory)")
    if not cfg.data:
        raise ValueError("--data: the JSON Lines file to fine-tune on is required")
    if cfg.quantize == "nf4" and cfg.lora_r == 0:
        raise ValueError("--quantize nf4 (QLoRA) trains adapters over a frozen 4-bit base: give --lora-r too")
    if cfg.lora_train_embeddings and (not cfg.lora_r or isinstance(cfg, DPOConfig)):
        raise ValueError(
            "--lora-train-embeddings goes with --lora-r in smallm-sft (DPO's reference is the base with "
            "the adapters disabled, which must keep the starting embeddings)"
        )
    if cfg.lora_r and cfg.fsdp:
        raise ValueError("--fsdp shards full fine-tuning; LoRA runs replicate the small adapters with DDP")
    settings = cfg.lora()
    if settings is not None:
        settings.validate()
    if isinstance(cfg, DPOConfig):
        if not cfg.beta > 0:
            raise ValueError(f"beta must be positive, got {cfg.beta}")
        if cfg.fsdp:
            raise ValueError("smallm-dpo does not shard with --fsdp; use DDP, or LoRA for large models")


def build_config(cls: type[RunConfig], values: dict[str, Any], source: str = "config") -> Any:
    """A validated ``cls`` from a flat dict of settings (unknown keys refused, naming ``source``)."""
    config = from_mapping(cls, values, source)
    validate(config)
    return config
