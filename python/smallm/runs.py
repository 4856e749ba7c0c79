"""Runs on disk: finding and opening a trained model with its tokenizer, and writing a run of one checkpoint.

A run directory (``smallm-train --out RUN``) holds ``config.json``, ``tokenizer.json`` and
``checkpoints/step_*/``; a checkpoint directory holds ``model.safetensors`` and ``config.json``
(``{"train": ..., "model": ...}``, plus ``lora`` for an adapter run). :func:`load_model` opens either,
merging a LoRA run's adapter into the base it names. :func:`write_run` is the one writer of a run that
holds weights only (what ``smallm-import`` and ``smallm-merge`` make); :func:`merge_run` is
``smallm-merge``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from smallm.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    TrainingState,
    best_checkpoint,
    latest_checkpoint,
    load_weights,
    save_checkpoint,
)
from smallm.errors import listing
from smallm.files import check_destination, sha256_file, write_folder_atomic
from smallm.lora import ADAPTER_CONFIG, AdapterError, LoraSettings, merge_adapter, read_adapter
from smallm.model import ModelConfig, SmallLM
from smallm.tokenizer import Tokenizer

__all__ = [
    "INFERENCE_FILES",
    "check_base",
    "find_tokenizer",
    "load_model",
    "merge_run",
    "read_config",
    "resolve_checkpoint",
    "run_dir_of",
    "write_run",
]

PathLike = Union[str, "os.PathLike[str]"]


INFERENCE_FILES = (WEIGHTS_FILE, CONFIG_FILE)
"""What opening a checkpoint's model needs (not the optimizer state, which only ``--resume`` reads)."""


def resolve_checkpoint(path: PathLike, *, prefer: str = "latest") -> Path:
    """The checkpoint directory ``path`` names: itself, or a run directory's latest (or best) that holds
    the weights and the config."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = best_checkpoint(path, INFERENCE_FILES) if prefer == "best" else None
    found = found or latest_checkpoint(path, INFERENCE_FILES)
    if found is None:
        raise CheckpointError(f"{path}: holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step_X`` -> ``RUN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def read_config(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``config.json``, which must have a ``model`` section."""
    try:
        config = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / CONFIG_FILE}: cannot read the run config: {e}") from e
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{checkpoint / CONFIG_FILE}: no model section; not a smallm checkpoint")
    return config


def find_tokenizer(checkpoint: Path, config: dict[str, Any]) -> Tokenizer:
    """The tokenizer beside the checkpoint, in its run directory, or in the run's data directory."""
    from smallm.config import data_sources

    try:
        sources = data_sources((config.get("train") or {}).get("data"))
    except ValueError:
        sources = []
    data = sources[0][0] if sources else None  # a mixture's sources share one tokenizer
    for place in (checkpoint, run_dir_of(checkpoint), Path(data) if data else None):
        if place is not None and (place / "tokenizer.json").is_file():
            return Tokenizer.load(place)
    raise CheckpointError(f"no tokenizer.json beside {checkpoint}, in its run directory, or in the data ({data})")


def load_model(
    path: PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, prefer: str = "latest"
) -> tuple[SmallLM, Tokenizer, dict[str, Any]]:
    """The model of a checkpoint (in eval mode, on ``device``), its tokenizer and its run config."""
    checkpoint = resolve_checkpoint(path, prefer=prefer)
    config = read_config(checkpoint)
    model = _lora_merged(checkpoint, config) if "lora" in config else _plain_model(checkpoint, config)
    broken = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if broken:
        raise CheckpointError(
            f"{checkpoint}: the weights {listing(broken)} hold NaN or infinite values (the run diverged before "
            "this save?); open an earlier checkpoint (--prefer best, or a step directory)"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, find_tokenizer(checkpoint, config), config


def _plain_model(checkpoint: Path, config: dict[str, Any]) -> SmallLM:
    try:
        model_config = ModelConfig(**config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / CONFIG_FILE}: the model section is not valid here: {e}") from e
    model = _model_class(config)(model_config)
    result = model.load_state_dict(load_weights(checkpoint), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the configured model "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return model


def _model_class(config: dict[str, Any]) -> type[SmallLM]:
    """The class a run's weights belong to: a reward model's (``finetune.method`` rm) or the language model."""
    if (config.get("finetune") or {}).get("method") == "rm":
        from smallm.reward import RewardModel

        return RewardModel
    return SmallLM


def _lora_merged(checkpoint: Path, config: dict[str, Any]) -> SmallLM:
    """A LoRA run's checkpoint holds its adapter: the base it names, with the adapter merged in."""
    lora = config["lora"]
    base_path = Path(lora.get("base", ""))
    if not base_path.exists():
        raise CheckpointError(
            f"{checkpoint} holds a LoRA adapter for the base {base_path}, which is gone; "
            "merge it onto that base's weights with smallm-merge --base"
        )
    base_checkpoint = resolve_checkpoint(base_path)
    check_base(lora, base_checkpoint, checkpoint)
    base, _, _ = load_model(base_checkpoint)
    if _model_class(config) is not SmallLM and not isinstance(base, _model_class(config)):
        base = _model_class(config).from_lm(base)  # type: ignore[attr-defined]  # the head comes from the adapter
    try:
        return merge_adapter(base, LoraSettings.from_run_config(lora), load_weights(checkpoint), str(checkpoint))
    except AdapterError as e:
        raise CheckpointError(str(e)) from e


def check_base(lora: dict[str, Any], base: Path, adapter: PathLike, *, chosen: bool = False) -> None:
    """Refuses to put the adapter of ``adapter`` (a LoRA run whose config has the ``lora`` section) on the
    checkpoint ``base`` when its weights are not the ones the adapter was trained on (the sha256 the run
    recorded; runs made before it was recorded are not checked). A base the user ``chosen`` explicitly
    (``--base``) only gets a warning."""
    expected = lora.get("base_sha256")
    if expected is None:
        return
    found = sha256_file(base / WEIGHTS_FILE)
    if found == expected:
        return
    if chosen:
        warnings.warn(
            f"{base} is not the base {adapter} was trained on (other weights); merging as asked", stacklevel=2
        )
        return
    raise CheckpointError(
        f"{adapter} was trained on a base whose weights have sha256 {expected[:16]}..., but {base} now holds "
        f"other weights ({found[:16]}...): that run was continued or replaced since. Give the original "
        f"base: smallm-merge {adapter} --base ORIGINAL --out DIR"
    )


def write_run(
    out: PathLike,
    model: nn.Module,
    tokenizer: Tokenizer | None,
    config: dict[str, Any],
    *,
    force: bool = False,
    source: PathLike | None = None,
) -> Path:
    """Writes the run directory ``out`` holding one checkpoint of ``model``'s weights
    (``checkpoints/step_00000000``, no optimizer state), ``config`` as its ``config.json`` and the
    tokenizer, as one atomic folder. An existing non-empty ``out`` is replaced only with ``force``, and
    never when it is or holds ``source``. Returns ``out``."""
    out = Path(os.path.abspath(out))
    check_destination(out, force, source=source)

    def fill(run: Path) -> None:
        save_checkpoint(run, model, None, None, None, TrainingState(step=0, tokens_seen=0), config)
        (run / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(run)

    return write_folder_atomic(out, fill)


def merge_run(source: PathLike, out: PathLike, *, base: PathLike | None = None, force: bool = False) -> Path:
    """Writes a run directory ``out`` holding the base with the adapter of ``source`` merged in.
    ``source``: a LoRA run or checkpoint of ``smallm-sft``/``smallm-dpo`` (its base is the one it names,
    unless ``base`` is given), or a peft adapter folder (then ``base`` is required unless the folder's
    ``base_model_name_or_path`` is a local smallm run). The tokenizer comes from the source run, else the
    base."""
    source = Path(source)
    tokenizer = None
    if (source / ADAPTER_CONFIG).is_file():
        settings, tensors, raw = read_adapter(source)
        named = raw.get("base_model_name_or_path")
        base = base or (named if named and Path(named).exists() else None)
        if base is None:
            raise AdapterError(f"{source}: name the smallm checkpoint the adapter was trained on with --base")
    else:
        checkpoint = resolve_checkpoint(source)
        config = read_config(checkpoint)
        if "lora" not in config:
            raise AdapterError(
                f"{checkpoint}: not a LoRA run (its config.json has no lora section) nor an adapter folder"
            )
        settings = LoraSettings.from_run_config(config["lora"])
        tensors = load_weights(checkpoint)
        check_base(config["lora"], resolve_checkpoint(base or config["lora"]["base"]), checkpoint, chosen=bool(base))
        base = base or config["lora"]["base"]
        with contextlib.suppress(CheckpointError):
            tokenizer = find_tokenizer(checkpoint, config)
    check_destination(out, force, source=source)
    model, base_tokenizer, _ = load_model(base)
    merged = merge_adapter(model, settings, tensors, str(source))
    run_config = {
        "train": {},
        "model": dataclasses.asdict(merged.config),
        "merged_from": {"adapter": str(source.absolute()), "base": str(Path(base).absolute())},
    }
    return write_run(out, merged, tokenizer or base_tokenizer, run_config, force=force, source=source)
