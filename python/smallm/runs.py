"""Finding and opening a trained model: a run directory or one of its checkpoints, with its tokenizer.

A run directory (``smallm-train --out RUN``) holds ``tokenizer.json`` and ``checkpoints/step_*/``; a
checkpoint directory holds ``model.safetensors`` and ``config.json`` (``{"train": ..., "model": ...}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

from smallm.checkpoint import CheckpointError, best_checkpoint, latest_checkpoint, load_weights
from smallm.model import ModelConfig, SmallLM
from smallm.tokenizer import Tokenizer

PathLike = Union[str, "os.PathLike[str]"]


def resolve_checkpoint(path: PathLike, *, prefer: str = "latest") -> Path:
    """The checkpoint directory ``path`` names: itself, or a run directory's latest (or best)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    found = best_checkpoint(path) if prefer == "best" else None
    found = found or latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step_X`` -> ``RUN``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def read_config(checkpoint: Path) -> dict[str, Any]:
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / 'config.json'}: cannot read the run config: {e}") from e
    if "model" not in config:
        raise CheckpointError(f"{checkpoint / 'config.json'}: no model section; not a smallm checkpoint")
    return config


def find_tokenizer(checkpoint: Path, config: dict[str, Any]) -> Tokenizer:
    """The tokenizer beside the checkpoint, in its run directory, or in the run's data directory."""
    data = (config.get("train") or {}).get("data")
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
    if "lora" in config:
        return _load_lora_run(checkpoint, config, device, dtype)
    try:
        model_config = ModelConfig(**config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint / 'config.json'}: the model section is not valid here: {e}") from e
    model = SmallLM(model_config)
    weights = load_weights(checkpoint)
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the configured model "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, find_tokenizer(checkpoint, config), config


def _load_lora_run(
    checkpoint: Path, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype | None
) -> tuple[SmallLM, Tokenizer, dict[str, Any]]:
    """A LoRA run's checkpoint holds its adapter: the base it names, with the adapter merged in."""
    from smallm.lora import AdapterError, LoraSettings, merge_adapter

    lora = config["lora"]
    base_path = Path(lora.get("base", ""))
    if not base_path.exists():
        raise CheckpointError(
            f"{checkpoint} holds a LoRA adapter for the base {base_path}, which is gone; "
            "merge it onto that base's weights with smallm-merge --base"
        )
    base, _, _ = load_model(base_path)
    settings = LoraSettings.from_run_config(lora)
    try:
        model = merge_adapter(base, settings, load_weights(checkpoint), str(checkpoint))
    except AdapterError as e:
        raise CheckpointError(str(e)) from e
    model.to(device=device, dtype=dtype).eval()
    return model, find_tokenizer(checkpoint, config), config  # type: ignore[return-value]
