"""Run configuration: one dataclass, each field documented once; files and the command line map onto it.

A field's help text lives in its ``metadata``; :func:`add_dataclass_arguments` turns the fields of a
dataclass into command-line flags (``--max-steps``), so a flag and its default exist in one place.
Precedence: dataclass defaults < a TOML or JSON config file < command-line flags. The model's shape
comes from a preset and can be changed field by field with ``--model-<field>`` flags or a ``[model]``
table in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def doc(help: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text."""
    return field(default=default, metadata={"help": help})


PRESET_LR = {"tiny": 3e-3, "38m": 1.5e-3, "124m": 6e-4, "350m": 3e-4, "tinyllama-1.1b": 4e-4}
"""Peak learning rates that suit each preset (smaller models take larger steps)."""


@dataclass
class TrainConfig:
    """How to pretrain: data, model, optimisation, precision, evaluation and checkpoints."""

    data: str | None = doc("shard directory from smallm-tokenize (default: built-in stdlib corpus)", None)
    out: str = doc("run directory for checkpoints, metrics.jsonl, config and plots", "runs/smallm")
    preset: str = doc("model preset: tiny, 38m, 124m, 350m, tinyllama-1.1b", "tiny")
    max_steps: int = doc("optimizer steps to train for", 300)
    batch_size: int = doc("sequences per micro-batch on each device", 8)
    seq_len: int | None = doc("tokens per sequence (default: the model's context)", None)
    grad_accum: int = doc("micro-batches per optimizer step", 1)
    sampling: str = doc("training rows: random windows, or documents (rows start at a document)", "random")
    lr: float | None = doc("peak learning rate (default: the preset's, see PRESET_LR)", None)
    min_lr_ratio: float = doc("the cosine decay ends at this fraction of the peak", 0.1)
    warmup_steps: int = doc("steps of linear warm-up from 0 to the peak", 30)
    weight_decay: float = doc("AdamW weight decay, applied to 2-D weights only", 0.1)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.95)
    grad_clip: float = doc("clip the global gradient norm to this (0: off)", 1.0)
    precision: str = doc("auto (bf16 if supported, else fp16 on CUDA, fp32 on CPU), bf16, fp16, fp32", "auto")
    compile: bool = doc("torch.compile the model (falls back with a warning where it cannot)", False)
    activation_checkpointing: bool = doc("recompute block activations in the backward pass", False)
    fsdp: bool = doc("shard parameters with FSDP2 instead of DDP under torchrun", False)
    device: str = doc("cpu, cuda, cuda:N or auto", "auto")
    seed: int = doc("seed for initialisation and data order", 1337)
    log_every: int = doc("steps between metric lines", 10)
    eval_every: int = doc("steps between validation passes (0: only at the end)", 100)
    eval_batches: int = doc("validation batches per pass (0: the whole split)", 0)
    checkpoint_every: int = doc("steps between checkpoints (the last step is always saved)", 100)
    keep_last: int = doc("checkpoints kept besides the best one", 3)
    resume: bool = doc("continue from the latest checkpoint in --out", False)
    init_from: str | None = doc(
        "start from these weights (a run, checkpoint or smallm-import directory) with a fresh optimizer; "
        "the model shape comes from there",
        None,
    )
    tensorboard: bool = doc("also log to TensorBoard (needs the tensorboard package)", False)
    wandb_project: str | None = doc("also log to this Weights & Biases project (needs wandb)", None)
    sample_prompt: str = doc("prompt of the sample generated at the end", "")
    sample_tokens: int = doc("tokens in the sample generated at the end", 120)
    dry_run: bool = doc("print parameters, FLOPs and memory estimates, then exit", False)
    model: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "overrides of the preset's ModelConfig fields", "cli": False}
    )

    def peak_lr(self) -> float:
        """The learning rate to use: ``lr``, else the preset's."""
        return self.lr if self.lr is not None else PRESET_LR.get(self.preset, 6e-4)

    def validate(self) -> None:
        """Raises ValueError naming the first field out of range."""
        positive = ("max_steps", "batch_size", "grad_accum", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.sampling not in ("random", "documents"):
            raise ValueError(f"sampling must be random or documents, got {self.sampling!r}")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.peak_lr() <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be positive and warmup_steps not negative")


_SIMPLE_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _base_type(annotation: Any) -> type:
    """``int | None`` or ``"int | None"`` -> int (annotations are strings under
    ``from __future__ import annotations``; parsed by hand because ``X | None`` needs Python 3.10)."""
    if not isinstance(annotation, str):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if args else annotation
    text = annotation.replace("Optional[", "").replace("]", "")
    names = [p.strip() for p in text.split("|") if p.strip() != "None"]
    return _SIMPLE_TYPES.get(names[0], str) if names else str


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Adds a ``--prefix-field-name`` flag per field; defaults are SUPPRESSed so that only the flags
    given on the command line override a config file."""
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind = _base_type(f.type)
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        helptext = f.metadata.get("help", "")
        dest = prefix.replace("-", "_") + f.name
        helptext = f"{helptext} (default: {default})"
        if kind is bool:
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=dest, action=action, default=argparse.SUPPRESS, help=helptext)
        else:
            parser.add_argument(
                flag, dest=dest, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                help=helptext,
            )  # fmt: skip


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML (``.toml``) or JSON file as a dict, with errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the config file: {e.strerror}") from e
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.9/3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise ValueError(f"{path}: reading TOML on Python < 3.11 needs `pip install tomli`") from e
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a JSON object")
    return data


def build_config(values: dict[str, Any], source: str = "config", cls: type[Any] = TrainConfig) -> Any:
    """A ``cls`` (TrainConfig or a subclass) from a flat dict (plus an optional ``model`` dict),
    rejecting unknown keys, validated."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(names)}")
    config = cls(**values)
    config.validate()
    return config
