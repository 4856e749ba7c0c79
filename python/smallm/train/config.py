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

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from smallm.data.sources import data_sources, normalise_data
from smallm.model.config import PRESETS, ModelConfig
from smallm.model.lora import LoraSettings
from smallm.options import check_fields, doc, from_mapping, redefault

__all__ = ["PRESET_BATCH_TOKENS", "DPOConfig", "FinetuneConfig", "RunConfig", "TrainConfig", "build_config", "validate"]

PRESET_BATCH_TOKENS = {"tiny": 2048, "38m": 2**17, "124m": 2**19, "350m": 2**19, "tinyllama-1.1b": 2**20}
"""Tokens per optimizer step that suit each preset (larger models take larger batches)."""
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
OPTIMIZERS = ("auto", "muon", "adamw", "paged-adamw")
SCHEDULES = ("wsd", "cosine")
DRY_RUN_STEPS, DRY_RUN_STEP_SECONDS = 3, 30.0
"""A plan measures this many steps on its device, by default when one should take under this many seconds."""


@dataclass
class RunConfig:
    """What every training run shares: output, steps, batches, optimisation, precision, parallelism,
    evaluation, checkpoints, logging and the sample generated at the end."""

    command: ClassVar[str] = "smallm"
    """The console script that runs this kind of run (for messages)."""

    out: str = doc("runs/smallm", "run directory for checkpoints, metrics.jsonl, config and plots")
    max_steps: int = doc(300, "optimizer steps to train for", minimum=0)
    batch_size: int = doc(8, "sequences per micro-batch on each device", minimum=1)
    seq_len: int | None = doc(None, "tokens per sequence (default: the model's context)", minimum=1)
    optimizer: str = doc(
        "auto",
        "muon (Muon for the block matrices, AdamW for the rest), adamw, paged-adamw (bitsandbytes, CUDA) or auto: "
        "muon for pretraining, adamw for fine-tuning, paged-adamw under QLoRA on CUDA",
        choices=OPTIMIZERS,
    )
    lr: float | None = doc(
        None, "peak learning rate of the matrices (Muon's, or AdamW's for all); default: scaled to the width and batch"
    )
    embedding_lr: float | None = doc(None, "Muon runs: AdamW's peak rate for the embedding (default: scaled)")
    head_lr: float | None = doc(None, "Muon runs: AdamW's peak rate for lm_head or a tied embedding (default: scaled)")
    norm_lr: float | None = doc(None, "Muon runs: AdamW's peak rate for the norm gains (default: scaled)")
    muon_momentum: float = doc(0.95, "Muon's momentum, reached after a warm-up from 0.85", minimum=0, below=1)
    schedule: str = doc(
        "wsd", "wsd (warm-up, stable, linear decay) or cosine (warm-up, cosine decay)", choices=SCHEDULES
    )
    decay_fraction: float = doc(0.6, "wsd: the share of the steps over which the rate decays", minimum=0, maximum=1)
    min_lr_ratio: float = doc(0.05, "the schedule ends at this fraction of the peak", minimum=0, maximum=1)
    warmup_steps: int = doc(30, "steps of linear warm-up from 0 to the peak", minimum=0)
    weight_decay: float = doc(0.1, "decoupled weight decay of the matrices (Muon's, or AdamW's 2-D weights)", minimum=0)
    beta1: float | None = doc(
        None, "AdamW's beta1 (default: 0.8 beside Muon, as nanochat; 0.9 alone)", minimum=0, below=1
    )
    beta2: float = doc(0.95, "AdamW's beta2", minimum=0, below=1)
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
    eval_tasks: str | None = doc(
        None, "lm-eval tasks run at each validation, comma-separated (needs lm-eval; a config file's [eval] tasks)"
    )
    eval_limit: int | None = doc(None, "items per lm-eval task at each validation (default: all)", minimum=1)
    eval_fewshot: int | None = doc(None, "few-shot examples of the lm-eval tasks (default: each task's)", minimum=0)
    eval_include_path: str | None = doc(None, "a folder of lm-eval task YAML files of one's own")
    checkpoint_every: int = doc(100, "steps between checkpoints (the last step is always saved)", minimum=1)
    keep_last: int = doc(3, "checkpoints kept besides the best one", minimum=1)
    resume: bool = doc(False, "continue from the latest checkpoint in --out")
    force: bool = doc(False, "start a new run in an --out that holds one, deleting its checkpoints and metrics")
    tensorboard: bool = doc(False, "also log to TensorBoard (needs the tensorboard package)")
    wandb_project: str | None = doc(None, "also log to this Weights & Biases project (needs wandb)")
    sample_prompt: str = doc("", "prompt of the sample generated at the end")
    sample_tokens: int = doc(120, "tokens in the sample generated at the end", minimum=1)
    dry_run: bool = doc(
        False, "print the plan (parameters trained, memory by item, FLOPs, time per step and to the end), then exit"
    )
    dry_run_steps: int | None = doc(
        None,
        "--dry-run: steps measured on this device for its time estimate (the first is not timed; 0: none; default: "
        f"{DRY_RUN_STEPS}, when a step should take under {DRY_RUN_STEP_SECONDS:g} s here)",
        minimum=0,
    )
    fit_memory: float | None = doc(None, "--dry-run: the memory (GiB) to fit in (default: this device's)", minimum=0)

    def micro_batches(self, seq_len: int, world_size: int) -> int:
        """Micro-batches of ``batch_size`` rows each rank runs per optimizer step."""
        raise NotImplementedError

    def inputs(self) -> list[str]:
        """What the run reads (its data, the weights it starts from): its ``out`` may neither be, hold nor
        lie inside any of them."""
        raise NotImplementedError


@dataclass
class TrainConfig(RunConfig):
    """Pretraining (``smallm-train``): shards, a model preset (or the weights to start from)."""

    command: ClassVar[str] = "smallm-train"

    data: Any = doc(  # noqa: RUF009 (a field)
        None,
        "shard directory from smallm-tokenize (default: built-in stdlib corpus); repeat as DIR:WEIGHT for a mixture "
        "(--data ko/:0.6 --data en/:0.4), in a config file a [[data]] list of {path, weight}",
        repeatable=True,
    )
    repeat: bool = doc(True, "a mixture's source that runs out starts again (--no-repeat: stop the run there)")
    preset: str = doc("tiny", "model preset", choices=tuple(PRESETS))
    batch_tokens: int | None = doc(
        None,
        "tokens per optimizer step over all ranks, in micro-batches of --batch-size rows (default: the preset's)",
        minimum=1,
    )
    init: str = doc(
        "zero-residual",
        "initialisation of a fresh model: zero-residual (o_proj and down_proj start at zero) or gpt2 (normal, the "
        "residual projections scaled by 1/sqrt(2 x layers))",
        choices=("zero-residual", "gpt2"),
    )
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
    verify_data: bool = doc(
        True, "read every shard once when the run opens the data: its sha256, token ids and document starts"
    )
    model: dict[str, Any] = doc(dict, "overrides of the preset's ModelConfig fields", cli=False)  # noqa: RUF009 (a field)
    stage: list[dict[str, Any]] = doc(  # noqa: RUF009 (a field)
        list,
        "training stages, in a config file's [[stage]] tables: each with steps (or tokens), and optionally a name, "
        "its data mixture, its batch_tokens and lr = stable or decay; max_steps is then their sum",
        cli=False,
    )

    def sources(self) -> list[tuple[str, float]]:
        """The (shard directory, weight) of every source: one of weight 1 for a plain ``--data DIR``."""
        return data_sources(self.data)

    def inputs(self) -> list[str]:
        data = [self.data, *(stage.get("data") for stage in self.stage if isinstance(stage, dict))]
        paths = [path for given in data for path, _ in data_sources(given)]
        return list(dict.fromkeys(paths + ([self.init_from] if self.init_from else [])))

    def step_tokens(self) -> int:
        """Tokens per optimizer step: ``batch_tokens``, else the preset's."""
        return self.batch_tokens or PRESET_BATCH_TOKENS.get(self.preset, 2**19)

    def micro_batches(self, seq_len: int, world_size: int) -> int:
        rows = self.batch_size * seq_len * world_size
        if self.step_tokens() % rows:
            raise ValueError(
                f"--batch-tokens {self.step_tokens()} is not a multiple of --batch-size {self.batch_size} x "
                f"seq_len {seq_len} x {world_size} rank(s) = {rows} tokens: change one of them"
            )
        return self.step_tokens() // rows


@dataclass
class FinetuneConfig(RunConfig):
    """Supervised fine-tuning (``smallm-sft``) of a checkpoint on conversations, in full or with LoRA."""

    method: ClassVar[str] = "sft"
    command: ClassVar[str] = "smallm-sft"

    out: str = redefault(RunConfig, "out", "runs/finetune")
    max_steps: int = redefault(RunConfig, "max_steps", 0)
    schedule: str = redefault(RunConfig, "schedule", "cosine")
    min_lr_ratio: float = redefault(RunConfig, "min_lr_ratio", 0.1)
    warmup_steps: int = redefault(RunConfig, "warmup_steps", 10)
    weight_decay: float = redefault(RunConfig, "weight_decay", 0.0)
    grad_accum: int = doc(1, "micro-batches per optimizer step", minimum=1)
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

    def micro_batches(self, seq_len: int, world_size: int) -> int:
        return self.grad_accum

    def inputs(self) -> list[str]:
        return [path for path in (self.init_from, self.data, self.val_data) if path]

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
    command: ClassVar[str] = "smallm-dpo"

    beta: float = doc(0.1, "strength of the pull towards the reference model (the starting weights)")


@dataclass
class RewardConfig(FinetuneConfig):
    """A reward model (``smallm-rm``) trained on preference pairs from a checkpoint, in full or with LoRA."""

    method: ClassVar[str] = "rm"
    command: ClassVar[str] = "smallm-rm"


def validate(cfg: RunConfig) -> None:
    """Raises ``ValueError`` naming the first setting of ``cfg`` that is out of range or that contradicts
    another; changes nothing (:func:`smallm.train.resolve.resolve` fills in what follows from them)."""
    check_fields(cfg)
    for name in ("lr", "embedding_lr", "head_lr", "norm_lr"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.resume and cfg.force:
        raise ValueError("--resume continues the run in --out and --force replaces it: give one of them")
    _validate_eval_tasks(cfg)
    if isinstance(cfg, TrainConfig):
        if not isinstance(cfg.stage, list):
            raise ValueError(f"stage must be a list of [[stage]] tables (each with steps or tokens), got {cfg.stage!r}")
        if not isinstance(cfg.model, dict):
            raise ValueError(f"model must be a table of the model's settings ([model] with n_layer = 8, ...), got "
                             f"{cfg.model!r}")  # fmt: skip
        normalise_data(cfg.data)
        stages = normalised_stages(cfg)
        decays = [s["lr"] == "decay" for s in stages]
        if any(decays) and decays != sorted(decays):
            raise ValueError("stage: the stages with lr = decay must come last (the schedule decays once, to the end)")
        steps = sum(s["steps"] for s in stages) if stages else cfg.max_steps
        if steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {steps}")
        _validate_model_section(cfg.preset, cfg.model)
    if isinstance(cfg, FinetuneConfig):
        _validate_finetuning(cfg)


def normalised_stages(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Every ``[[stage]]`` of ``cfg`` with its keys filled in (:func:`normalise_stage`)."""
    return [normalise_stage(s, i, cfg) for i, s in enumerate(cfg.stage)]


STAGE_KEYS = ("name", "steps", "tokens", "data", "batch_tokens", "lr", "train")


def normalise_stage(stage: Any, index: int, cfg: TrainConfig) -> dict[str, Any]:
    """A ``[[stage]]`` table with every key filled: ``name`` (default ``stageN``), ``steps`` (given, or the
    ``tokens`` over the stage's ``batch_tokens``, rounded up), ``data`` (default: the run's), ``batch_tokens``
    (default: the run's), ``lr`` (``stable``, or ``decay``: the schedule's decay spans the decay stages) and
    ``train`` (``all``, or ``new-tokens``: only the embedding and head rows of the tokens the data's tokenizer
    adds to the ``init_from`` model's, :mod:`smallm.train.new_rows`). Raises ``ValueError`` naming the stage
    and the key."""
    where = f"stage[{index}]"
    if not isinstance(stage, dict):
        raise ValueError(f"{where}: expected a table of {', '.join(STAGE_KEYS)}, got {stage!r}")
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {list(STAGE_KEYS)}")
    name = stage.get("name", f"stage{index}")
    batch_tokens = stage.get("batch_tokens", cfg.step_tokens())
    for key, value in (("batch_tokens", batch_tokens), ("steps", stage.get("steps")), ("tokens", stage.get("tokens"))):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where} ({name}): {key} must be a positive integer, got {value!r}")
    if ("steps" in stage) == ("tokens" in stage):
        raise ValueError(f"{where} ({name}): give its length as steps or as tokens (one of them)")
    steps = stage["steps"] if "steps" in stage else -(-stage["tokens"] // batch_tokens)
    lr = stage.get("lr", "stable")
    if lr not in ("stable", "decay"):
        raise ValueError(f"{where} ({name}): lr must be stable or decay, got {lr!r}")
    data = normalise_data(stage.get("data", cfg.data))
    if data is None:
        raise ValueError(f"{where} ({name}): no data: give the stage's data or the run's --data")
    train = stage.get("train", "all")
    if train not in ("all", "new-tokens"):
        raise ValueError(f"{where} ({name}): train must be all or new-tokens, got {train!r}")
    if train == "new-tokens" and not cfg.init_from:
        raise ValueError(f"{where} ({name}): train = new-tokens trains the rows a vocabulary extension adds to the "
                         "--init-from model; give --init-from")  # fmt: skip
    return {"name": name, "steps": steps, "data": data, "batch_tokens": batch_tokens, "lr": lr, "train": train}


def _validate_model_section(preset: str, overrides: dict[str, Any]) -> None:
    """The ``[model]`` overrides (``--model-<field>``) must be ModelConfig fields of the right types."""
    known = sorted(f.name for f in fields(ModelConfig))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"model: unknown setting(s) {unknown}; known: {known}")
    try:
        model = ModelConfig.preset(preset, **overrides)
    except (TypeError, ValueError) as e:  # ModelConfig's own checks, or a value they cannot compare
        raise ValueError(f"model: {e}") from e
    check_fields(model, "model")


def _validate_eval_tasks(cfg: RunConfig) -> None:
    if not (cfg.eval_tasks or "").strip(",; "):
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError('--eval-tasks runs lm-evaluation-harness, which is not installed: pip install "smallm[eval]"')
    if cfg.fsdp:
        raise ValueError("--eval-tasks scores the model on one rank: it does not run under --fsdp (use DDP)")
    if getattr(cfg, "method", "") == "rm":
        raise ValueError("--eval-tasks scores a language model; a reward model has no next-token distribution")


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


EVAL_TABLE = {"tasks": "eval_tasks", "limit": "eval_limit", "num_fewshot": "eval_fewshot",
              "include_path": "eval_include_path"}  # fmt: skip
"""A config file's ``[eval]`` table: its keys and the settings they are."""


def build_config(cls: type[RunConfig], values: dict[str, Any], source: str = "config") -> Any:
    """A validated ``cls`` from a flat dict of settings (unknown keys refused, naming ``source``); an
    ``[eval]`` table (:data:`EVAL_TABLE`) gives the ``eval_*`` settings, its ``tasks`` a list or one string."""
    values = dict(values)
    table = values.pop("eval", None)
    if table is not None:
        if not isinstance(table, dict) or set(table) - set(EVAL_TABLE):
            raise ValueError(f"{source}: [eval] takes {', '.join(EVAL_TABLE)}, got {table!r}")
        for key, value in table.items():
            if key == "tasks" and isinstance(value, list):
                value = ",".join(map(str, value))
            values.setdefault(EVAL_TABLE[key], value)
    config = from_mapping(cls, values, source)
    validate(config)
    return config
