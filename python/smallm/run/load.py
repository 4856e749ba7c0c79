"""Opening a run: finding a checkpoint, reading its settings, and loading its model and tokenizer.

A run directory (:mod:`smallm.run.layout`) holds ``config.json``, the tokenizer and ``checkpoints/step_*/``;
a checkpoint directory holds ``model.safetensors`` and ``config.json`` (``{"train": ..., "model": ...}``,
plus ``lora`` for an adapter run and ``finetune`` for a fine-tuned one). :func:`load_model` opens either:
a reward model's run as a :class:`~smallm.model.reward.RewardModel`, a LoRA run's adapter merged into the
base it names. :mod:`smallm.run.write` writes runs of weights only.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Union

import torch

from smallm.data.sources import data_sources
from smallm.errors import listing
from smallm.files.atomic import sha256_file
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.model.lora import AdapterError, LoraSettings, merge_adapter
from smallm.model.reward import RewardModel
from smallm.run.checkpoint import CheckpointError, best_checkpoint, latest_checkpoint, load_weights
from smallm.run.layout import CHECKPOINTS_DIR, CONFIG_FILE, WEIGHTS_FILE, has_tokenizer
from smallm.text.tokenizer import Tokenizer

__all__ = [
    "INFERENCE_FILES",
    "check_base",
    "find_tokenizer",
    "inputs_of",
    "load_model",
    "read_config",
    "resolve_checkpoint",
    "run_dir_of",
    "run_kind",
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
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint


def inputs_of(checkpoint: Path) -> list[Path]:
    """What opening ``checkpoint`` reads: the checkpoint, its run directory and, for a LoRA run, the base it
    names; a command that writes may not write over any of them."""
    lora = (read_config(checkpoint).get("lora") or {}).get("base")
    return [run_dir_of(checkpoint), checkpoint, *([Path(lora)] if lora else [])]


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
    try:
        sources = data_sources((config.get("train") or {}).get("data"))
    except ValueError:
        sources = []
    data = sources[0][0] if sources else None  # a mixture's sources share one tokenizer
    for place in (checkpoint, run_dir_of(checkpoint), Path(data) if data else None):
        if place is not None and has_tokenizer(place):
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
    weights = load_weights(checkpoint)
    expected = model.state_dict()
    wrong = [f"{key} is {list(weights[key].shape)} there, {list(t.shape)} by the model section"
             for key, t in expected.items() if key in weights and weights[key].shape != t.shape]  # fmt: skip
    if wrong:
        raise CheckpointError(
            f"{checkpoint}: the weights in {WEIGHTS_FILE} do not have the shapes {CONFIG_FILE} gives them "
            f"({listing(wrong, 3)}): its model section (vocab_size, n_embd, n_head, n_kv_head, head_dim, "
            "intermediate_size, n_layer) does not describe these weights"
        )
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit the configured model "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return model


def run_kind(config: dict[str, Any]) -> str:
    """What a run's model is, from its config: ``"reward"`` (``smallm-rm``'s) or ``"lm"`` (a language model)."""
    return "reward" if (config.get("finetune") or {}).get("method") == "rm" else "lm"


def _model_class(config: dict[str, Any]) -> type[SmallLM]:
    """The class a run's weights belong to."""
    return RewardModel if run_kind(config) == "reward" else SmallLM


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
