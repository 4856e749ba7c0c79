"""The settings a run actually uses: every default filled in once, in one place, from what was given.

:func:`validate` only checks the settings as given; :func:`resolve` turns them into the effective ones,
which everything then reads (the trainer, ``--dry-run``, the notebook) and ``config.json`` records:

* the data: the built-in stdlib corpus when a pretraining run names none (its output directory
  ``runs/stdlib-PRESET`` unless ``--out`` was given, and the demo's sample prompt), the mixture and the
  stages in their stored form, the run's length from its stages and the share of it the rate decays over;
* the device (``auto``: CUDA when there is one, this rank's under torchrun) and the precision (``auto``:
  bf16 where supported, fp16 on older CUDA, fp32 on CPU);
* the optimizer (``auto``: Muon for pretraining, AdamW for fine-tuning and under FSDP, paged AdamW under
  QLoRA on CUDA) and each group's peak rate (:func:`smallm.train.optim.default_rates`, the ones given win),
  and AdamW's beta1 (0.8 beside Muon, 0.9 alone);
* LoRA over a base without a chat format also trains the embeddings (the ChatML markers' rows are new);
* the batch: ``seq_len`` (the model's context unless given) and, for pretraining, the tokens of a step
  (the preset's unless ``--batch-tokens``), which must split into micro-batches of ``--batch-size`` rows on
  every rank.

:func:`resume_changes` compares the resolved settings a run was started with against a resumed run's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from smallm.data.builtin import DEMO_PROMPT, builtin_corpus
from smallm.data.sources import data_sources, normalise_data
from smallm.errors import listing
from smallm.model.config import ModelConfig, padded_vocab
from smallm.options import default_of
from smallm.run.layout import CONFIG_FILE, read_json
from smallm.run.load import find_tokenizer, read_config, resolve_checkpoint, run_dir_of
from smallm.text.chat import with_chat_format
from smallm.text.extension import is_extension_of
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import FinetuneConfig, RunConfig, TrainConfig, normalised_stages, validate
from smallm.train.distributed import autocast_dtype
from smallm.train.optim import default_rates, resolve_optimizer

__all__ = [
    "NOT_INHERITED",
    "RESUMABLE",
    "is_resolved",
    "model_config_for",
    "model_config_of",
    "resolve",
    "resolve_optimization",
    "resolve_training",
    "resume_changes",
    "resumed_settings",
]

Config = TypeVar("Config", bound=RunConfig)

PRECISION_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
RESUMABLE = frozenset({
    "lr", "embedding_lr", "head_lr", "norm_lr", "max_steps", "epochs", "schedule", "warmup_steps",
    "decay_fraction", "min_lr_ratio", "grad_clip", "log_every", "eval_every", "eval_batches",
    "checkpoint_every", "keep_last", "tensorboard", "wandb_project", "sample_prompt", "sample_tokens",
    "compile", "activation_checkpointing", "device", "dry_run", "dry_run_steps", "fit_memory", "verify_data",
})  # fmt: skip
"""Settings a resumed run may change, and applies: the peak rates and the schedule (recomputed for the
new length), the run's length, clipping, and when it logs, validates, saves and what it samples."""
IGNORED = frozenset({"out", "resume", "force"})
NOT_INHERITED = frozenset({"out", "resume", "force", "dry_run", "dry_run_steps", "fit_memory", "device"})
"""What a resumed run never takes from the run's ``config.json``: where it is, how it was asked to run, and
the device (resolved on the machine that resumes)."""
FILLED = frozenset({
    "device", "precision", "optimizer", "lr", "embedding_lr", "head_lr", "norm_lr", "beta1", "seq_len", "batch_tokens",
})  # fmt: skip
"""What :func:`resolve` fills in: earlier smallm versions saved these unresolved (None or ``auto``)."""


def resolve(cfg: Config, device: torch.device, world_size: int = 1, model: ModelConfig | None = None) -> Config:
    """``cfg`` with every setting that follows from others filled in (see the module docstring), checked.
    ``model``: the shape of the model the run trains (default: read from the preset and the data's
    tokenizer, or the checkpoint it starts from, without loading any weights). Resolving resolved settings
    changes nothing."""
    validate(cfg)
    values = _pretraining_data(cfg) if isinstance(cfg, TrainConfig) else _finetuning_base(cfg)
    with_data = dataclasses.replace(cfg, **values)
    return resolve_training(with_data, device, world_size, model or model_config_of(with_data))


def resolve_training(cfg: Config, device: torch.device, world_size: int, model: ModelConfig) -> Config:
    """The part of :func:`resolve` that a trainer given its task and model by hand needs (the task has its
    data): the device, the precision, the optimizer and its rates, and the batch, for ``model``."""
    values: dict[str, Any] = {
        **_optimization(cfg, model, device),
        "device": str(device),
        "precision": PRECISION_NAMES[autocast_dtype(cfg.precision, device)],
        "seq_len": cfg.seq_len or model.max_seq_len,
    }
    if isinstance(cfg, TrainConfig):
        values["batch_tokens"] = cfg.step_tokens()
    resolved = dataclasses.replace(cfg, **values)
    if isinstance(resolved, FinetuneConfig):
        check_lora_rank(resolved, model)
    if resolved.seq_len > model.max_seq_len:
        raise ValueError(f"seq_len {resolved.seq_len} exceeds the model's context {model.max_seq_len}")
    resolved.micro_batches(resolved.seq_len, world_size)  # refuses a batch that does not split
    return resolved


def resolve_optimization(cfg: Config, model: ModelConfig, device: torch.device) -> Config:
    """``cfg`` with its optimizer and peak rates resolved alone (for building an optimizer by hand)."""
    return dataclasses.replace(cfg, **_optimization(cfg, model, device))


def _optimization(cfg: RunConfig, model: ModelConfig, device: torch.device) -> dict[str, Any]:
    """The optimizer, each group's peak rate (Muon's groups; AdamW's one rate alone) and AdamW's beta1."""
    optimizer = resolve_optimizer(cfg, device)
    finetune = (cfg.method, cfg.lora_r > 0) if isinstance(cfg, FinetuneConfig) else None
    rates = default_rates(optimizer, model.n_embd, finetune)
    muon = optimizer == "muon"

    def rate(given: float | None, default: float) -> float | None:
        return (given if given is not None else default) if muon else None

    return {
        "optimizer": optimizer,
        "lr": cfg.lr if cfg.lr is not None else rates.matrix,
        "embedding_lr": rate(cfg.embedding_lr, rates.embedding),
        "head_lr": rate(cfg.head_lr, rates.head),
        "norm_lr": rate(cfg.norm_lr, rates.norm),
        "beta1": cfg.beta1 if cfg.beta1 is not None else (0.8 if muon else 0.9),
    }


def check_lora_rank(cfg: FinetuneConfig, model: ModelConfig) -> None:
    """Refuses a LoRA rank above the smaller side of a layer it adapts: an update of that rank does not exist
    (and its adapters would be larger than the layer)."""
    settings = cfg.lora()
    if settings is None:
        return
    shapes = model.projections()
    name, smallest = min(((t, min(shapes[t])) for t in settings.targets), key=lambda item: item[1])
    if settings.r > smallest:
        raise ValueError(
            f"--lora-r {settings.r} is above the rank a layer it adapts can have: {name} of this model is "
            f"{shapes[name][0]} x {shapes[name][1]}; choose --lora-r {smallest} or less (8 to 64 is usual)"
        )


def is_resolved(cfg: RunConfig) -> bool:
    """Whether ``cfg`` came from :func:`resolve`."""
    open_ = cfg.optimizer == "auto" or "auto" in (cfg.device, cfg.precision) or None in (cfg.lr, cfg.seq_len)
    return not open_ and not (isinstance(cfg, TrainConfig) and cfg.batch_tokens is None)


def _pretraining_data(cfg: TrainConfig) -> dict[str, Any]:
    """The data, stages, length, decay and (on the built-in corpus) output and sample prompt of ``cfg``."""
    values: dict[str, Any] = {"data": normalise_data(cfg.data), "stage": normalised_stages(cfg)}
    stages = values["stage"]
    if stages:
        values["max_steps"] = sum(s["steps"] for s in stages)
        decay = sum(s["steps"] for s in stages if s["lr"] == "decay")
        if decay:
            values["decay_fraction"] = decay / values["max_steps"]
    elif cfg.data is None:
        values["data"] = str(builtin_corpus())
        values["sample_prompt"] = cfg.sample_prompt or DEMO_PROMPT
        values["out"] = _output_of(cfg)
    return values


def _output_of(cfg: RunConfig) -> str:
    """The run directory: ``--out``, or ``runs/stdlib-PRESET`` for a pretraining run on the built-in corpus
    that names none."""
    if isinstance(cfg, TrainConfig) and cfg.data is None and not cfg.stage:
        out_field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "out")
        if cfg.out == default_of(out_field):
            return f"runs/stdlib-{cfg.preset}"
    return cfg.out


def resumed_settings(cfg: Config, given: Iterable[str]) -> Config:
    """For ``--resume``: ``cfg`` with every setting that was not ``given`` taken from the run it continues
    (the ``train`` section of its ``config.json``), so that a run resumes with its own settings and the
    flags given change only those; the device is resolved anew. Without a run there, ``cfg`` itself."""
    saved = read_json(Path(_output_of(cfg)) / CONFIG_FILE)
    section = saved.get("train") if isinstance(saved, dict) else None
    if not isinstance(section, dict):
        return cfg
    names = {f.name for f in dataclasses.fields(cfg)} - set(given) - NOT_INHERITED
    return dataclasses.replace(cfg, **{name: section[name] for name in names if name in section})


def _finetuning_base(cfg: RunConfig) -> dict[str, Any]:
    """LoRA trains the embeddings too when the base has no chat format: the rows of the ChatML markers
    fine-tuning adds to its vocabulary are new (:func:`smallm.text.chat.with_chat_format`)."""
    assert isinstance(cfg, FinetuneConfig)
    if not cfg.lora_r or cfg.lora_train_embeddings:
        return {}
    base = resolve_checkpoint(cfg.init_from or "")
    tokenizer = find_tokenizer(base, read_config(base))
    return {"lora_train_embeddings": True} if with_chat_format(tokenizer).roles.added else {}


def model_config_of(cfg: RunConfig) -> ModelConfig:
    """The shape of the model ``cfg`` trains, from configuration files only: a fine-tuned checkpoint's, or
    for pretraining the preset with its overrides (or the ``init_from`` checkpoint's) over the data's
    tokenizer."""
    if isinstance(cfg, FinetuneConfig):
        return ModelConfig(**read_config(resolve_checkpoint(cfg.init_from or ""))["model"])
    assert isinstance(cfg, TrainConfig)
    sources = data_sources(cfg.data) or [p for s in cfg.stage for p in data_sources(s["data"])]
    if not sources or not Path(sources[0][0]).is_dir():
        where = sources[0][0] if sources else None
        raise ValueError(f"--data {where}: not a directory; make one with smallm-tokenize CORPUS --out DIR")
    tokenizer = Tokenizer.load(sources[0][0])
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    if init is not None:
        base = check_init_tokenizer(init, tokenizer, sources[0][0])
        restricted = [s.get("name", i) for i, s in enumerate(cfg.stage) if s.get("train") == "new-tokens"]
        if restricted and tokenizer.vocab_size <= base.vocab_size:
            raise ValueError(
                f"stage {restricted[0]}: train = new-tokens, but the data's tokenizer adds no token to {init}'s; "
                "pack the data with an extension of it (smallm-tokenize CORPUS --tokenizer RUN --extend N)"
            )
        if restricted and cfg.fsdp:
            raise ValueError(f"stage {restricted[0]}: train = new-tokens does not run under --fsdp; use DDP")
    return model_config_for(cfg, tokenizer, init)


def check_init_tokenizer(init: Path, tokenizer: Tokenizer, data: str) -> Tokenizer:
    """The tokenizer of ``init``. Refuses to continue its model on shards packed with another tokenizer that
    does not extend it (:func:`smallm.text.extension.is_extension_of`): its ids would mean other tokens (the
    loss starts where a fresh model's does). An extension is fine: the model grows to it."""
    theirs = find_tokenizer(init, read_config(init))
    if theirs.to_json() != tokenizer.to_json() and not is_extension_of(tokenizer, theirs):
        run = run_dir_of(init)
        raise ValueError(
            f"--init-from {init} was trained with another tokenizer ({theirs.vocab_size} ids) than the one --data "
            f"{data} was packed with ({tokenizer.vocab_size} ids), and that one does not extend it: its ids would "
            f"mean other tokens. Pack the corpus with the model's tokenizer (smallm-tokenize CORPUS --tokenizer "
            f"{run} --out DIR) or with an extension of it (add --extend N)"
        )
    return theirs


def model_config_for(cfg: TrainConfig, tokenizer: Tokenizer, init: Path | None = None) -> ModelConfig:
    """The preset with the run's overrides, or the shape of the ``init`` checkpoint (grown to a tokenizer
    that extends its own); the vocabulary defaults to the tokenizer's, rounded up to a multiple of 64 for
    faster matmuls."""
    if init is not None:
        mc = ModelConfig(**read_config(init)["model"])
        if tokenizer.vocab_size > mc.vocab_size:  # an extension of its tokenizer: the embedding grows
            mc = dataclasses.replace(mc, vocab_size=padded_vocab(tokenizer.vocab_size))
    else:
        overrides = dict(cfg.model)
        overrides.setdefault("vocab_size", padded_vocab(tokenizer.vocab_size))
        mc = ModelConfig.preset(cfg.preset, **overrides)
    if mc.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"the model's vocab_size {mc.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}: "
            "ids past the embedding table would crash training; raise model.vocab_size"
        )
    return mc


def resume_changes(saved: Mapping[str, Any], now: Mapping[str, Any], where: str) -> list[str]:
    """The settings of ``now`` that differ from ``saved`` (the run's ``train`` section at the checkpoint
    ``where``), as ``name: old -> new`` lines. Raises ``ValueError`` naming every changed setting a
    resumed run cannot apply (only :data:`RESUMABLE` ones may change). A setting an earlier smallm saved
    unresolved (``None`` or ``auto``) counts as unchanged."""
    changed = {
        k: (saved[k], v)
        for k, v in now.items()
        if k in saved and k not in IGNORED and saved[k] != v and not (k in FILLED and saved[k] in (None, "auto"))
    }
    # Stages may be appended (continual pretraining carries the optimizer on), never rewritten.
    appended = "stage" in changed and changed["stage"][1][: len(changed["stage"][0])] == changed["stage"][0]
    refused = sorted(k for k in changed if k not in RESUMABLE and not (k == "stage" and appended))
    if refused:
        details = [f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused]
        raise ValueError(
            f"--resume from {where} cannot change {listing(details)}: the checkpoint's state depends on them. "
            "Resume with the run's settings, or start a new run from its weights"
        )
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())]
