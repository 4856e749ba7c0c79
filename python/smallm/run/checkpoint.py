"""Checkpoints: save a training run's whole state and resume it bitwise-identically.

A checkpoint is a directory ``run_dir/checkpoints/step_{step:08d}/`` holding

* ``model.safetensors``: the model's state dict (readable without smallm). A tensor that is the very
  same memory as an earlier key's (a tied ``lm_head.weight``) is stored once; the metadata maps each
  dropped key to the key it is tied to (``"tied"``, JSON) and says whether any is (``"tied_embeddings"``).
* ``training_state.pt``: ``torch.save`` of the optimizer, scheduler and grad-scaler state dicts, the RNG
  states (:func:`smallm.run.rng.capture_rng_state`), the :class:`TrainingState` and ``"format_version"``.
* ``config.json``: the run's configuration, as given.

``run_dir/checkpoints/latest`` and ``best`` are one-line text files naming a step directory.

A save never damages what is there: the step directory is written as an atomic folder and the pointers
as atomic files (:mod:`smallm.files.atomic`: a synced temporary, then a rename), and only then are old
checkpoints pruned. A failed save (a full disk) removes its partial files and leaves the previous
checkpoints and pointers as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import safetensors
import safetensors.torch
import torch

from smallm.errors import SmallmError, listing
from smallm.files.atomic import write_folder_atomic, write_text_atomic
from smallm.run.layout import BEST, CHECKPOINTS_DIR, CONFIG_FILE, LATEST, STATE_FILE, WEIGHTS_FILE
from smallm.run.rng import capture_rng_state, restore_rng_state

FORMAT_VERSION = 1
CHECKPOINT_FILES = (WEIGHTS_FILE, STATE_FILE, CONFIG_FILE)
_STEP_DIR = re.compile(r"step_(\d{8,})")

PathLike = Union[str, os.PathLike]


class CheckpointError(SmallmError, RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the reason."""


@dataclass
class TrainingState:
    """Everything besides the weights and the optimizer that a run needs to resume exactly."""

    step: int
    """Optimizer steps done."""
    tokens_seen: int
    """Training tokens consumed so far."""
    best_val_loss: float | None = None
    """Lowest validation loss so far (None before the first evaluation)."""
    loader: dict = field(default_factory=dict)
    """The data loader's ``state_dict()`` (plain ints and lists)."""
    extra: dict = field(default_factory=dict)
    """Free-form (e.g. metrics history): plain Python values, tensors, numpy scalars or arrays."""


def save_checkpoint(
    run_dir: PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: Any,
    state: TrainingState,
    config: dict[str, Any],
    *,
    keep_last: int = 3,
    is_best: bool = False,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes ``run_dir/checkpoints/step_{state.step:08d}/`` atomically, points ``latest`` (and ``best``
    when ``is_best``) at it, then deletes all but the ``keep_last`` newest checkpoints up to this step,
    never the best one. ``optimizer``, ``scheduler`` and ``scaler`` may be None (a checkpoint of weights
    only, which inference reads and ``--resume`` refuses); ``model`` may be wrapped in DDP or
    ``torch.compile``. ``weights``: the tensors to store instead of the model's state dict (a LoRA run
    keeps its adapter only). Checkpoints of later steps (a run resumed from an earlier one) are left alone
    until this run overwrites them. Raises :class:`CheckpointError`, with nothing changed, on failure."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, not {keep_last}")
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    final = checkpoints / f"step_{state.step:08d}"
    previous = latest_checkpoint(run_dir)
    config_text = _config_json(config)
    if weights is None:
        tensors, ties = _weights_to_save(model)
    else:
        tensors, ties = {k: t.detach().to("cpu").contiguous() for k, t in weights.items()}, {}
    payload = {
        "format_version": FORMAT_VERSION,
        "training_state": _plain(dataclasses.asdict(state)),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": capture_rng_state(),
        "tied": ties,
    }
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        write_folder_atomic(
            final, lambda directory: _write_checkpoint_files(directory, tensors, ties, payload, config_text)
        )
        for name in (LATEST, BEST) if is_best else (LATEST,):
            write_text_atomic(checkpoints / name, final.name + "\n")
    except Exception as error:
        disk_full = " (disk full?)" if isinstance(error, OSError) else ""
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {final}{disk_full}: {error}; {kept}") from error
    _prune(checkpoints, state.step, keep_last)
    return final


def latest_checkpoint(run_dir: PathLike, needs: tuple[str, ...] = CHECKPOINT_FILES) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names; if that file or its directory is gone, or it lacks
    one of the files in ``needs`` (by default all: what ``--resume`` needs; inference needs only the
    weights and the config), the ``step_*`` directory with the highest step that has them all; None
    when there is none."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    pointed = _read_pointer(checkpoints, LATEST, needs)
    if pointed is not None:
        return pointed
    complete = [path for _, path in _step_dirs(checkpoints) if _is_complete(path, needs)]
    return complete[-1] if complete else None


def best_checkpoint(run_dir: PathLike, needs: tuple[str, ...] = CHECKPOINT_FILES) -> Path | None:
    """The checkpoint ``checkpoints/best`` names, or None (no such file, its directory is gone, or it
    lacks one of ``needs``)."""
    return _read_pointer(Path(run_dir) / CHECKPOINTS_DIR, BEST, needs)


def load_checkpoint(
    path: PathLike,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    *,
    map_location: Any = "cpu",
    restore_rng: bool = True,
) -> tuple[TrainingState, dict[str, Any]]:
    """Loads the checkpoint directory ``path`` into ``model`` (unless None) and whichever of ``optimizer``,
    ``scheduler`` and ``scaler`` are given, restores the RNG states (unless ``restore_rng`` is False),
    and returns ``(state, config)``. ``map_location`` applies to ``training_state.pt``; the weights are
    copied into the model's own tensors wherever they live, so ties are kept. Raises
    :class:`CheckpointError` for a missing or incomplete checkpoint, another format version, or weights
    that do not fit the model (naming the missing and unexpected keys and the shape mismatches)."""
    path = Path(path)
    _check_complete(path)
    payload = _read_state_file(path / STATE_FILE, map_location)
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"could not read {path / CONFIG_FILE}: {error}") from error
    if model is not None:
        _load_weights_into(_unwrap(model), path / WEIGHTS_FILE)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None:
            continue
        if payload.get(name) is None:
            weights_only = (
                " (it holds weights only: start a run from it with --init-from)" if name == "optimizer" else ""
            )
            raise CheckpointError(f"checkpoint {path} holds no {name} state, but a {name} was given{weights_only}")
        try:
            target.load_state_dict(payload[name])
        except (KeyError, RuntimeError, TypeError, ValueError) as error:
            raise CheckpointError(f"the {name} state in {path / STATE_FILE} does not fit: {error}") from error
    if restore_rng:
        restore_rng_state(payload["rng"])
    try:
        state = TrainingState(**payload["training_state"])
    except TypeError as error:
        raise CheckpointError(f"bad training state in {path / STATE_FILE}: {error}") from error
    return state, config


def load_weights(path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint directory's ``model.safetensors`` (or that file itself), on the
    CPU, with each tied key that was dropped at save time back as the same tensor as its target."""
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no weights at {file}")
    try:
        with safetensors.safe_open(str(file), framework="pt") as weights:
            tensors = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118
            ties = json.loads((weights.metadata() or {}).get("tied", "{}"))
    except Exception as error:
        raise CheckpointError(f"could not read {file}: {error}") from error
    for alias, target in ties.items():
        tensors[alias] = tensors[target]
    return tensors


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers, so keys never carry their prefixes."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _find_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Maps each key whose tensor is exactly the same memory as an earlier key's to that key."""
    first: dict[tuple, str] = {}
    ties = {}
    for key, tensor in tensors.items():
        if tensor.numel() == 0:  # empty tensors may share a null pointer without being tied
            continue
        storage = tensor.untyped_storage().data_ptr()
        memory = (tensor.device, storage, tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        if memory in first:
            ties[key] = first[memory]
        else:
            first[memory] = key
    return ties


def _weights_to_save(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state_dict = _unwrap(model).state_dict()
    ties = _find_ties(state_dict)
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in state_dict.items() if k not in ties}
    # Tensors that overlap without being tied (views of one flat buffer) are copied apart, since
    # safetensors refuses shared memory.
    storages = [t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()]
    shared = {ptr for ptr in storages if storages.count(ptr) > 1}
    for key, tensor in tensors.items():
        if tensor.numel() and tensor.untyped_storage().data_ptr() in shared:
            tensors[key] = tensor.clone()
    return tensors, ties


def _write_checkpoint_files(
    directory: Path, tensors: dict[str, torch.Tensor], ties: dict[str, str], payload: dict, config_text: str
) -> None:
    metadata = {"format": "pt", "format_version": str(FORMAT_VERSION), "tied": json.dumps(ties)}
    metadata["tied_embeddings"] = json.dumps(bool(ties))
    safetensors.torch.save_file(tensors, str(directory / WEIGHTS_FILE), metadata=metadata)
    with open(directory / STATE_FILE, "wb") as file:
        torch.save(payload, file)
    (directory / CONFIG_FILE).write_text(config_text, encoding="utf-8")


def _prune(checkpoints: Path, new_step: int, keep_last: int) -> None:
    best = _read_pointer(checkpoints, BEST)
    older = [path for step, path in _step_dirs(checkpoints) if step < new_step]
    for path in older[: max(0, len(older) - (keep_last - 1))]:
        if path == best:
            continue
        try:
            shutil.rmtree(path)
        except OSError as error:
            warnings.warn(f"could not delete old checkpoint {path}: {error}", stacklevel=3)


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """The ``step_*`` directories, by step."""
    if not checkpoints.is_dir():
        return []
    found = []
    for entry in checkpoints.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _is_complete(path: Path, needs: tuple[str, ...] = CHECKPOINT_FILES) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in needs)


def _read_pointer(checkpoints: Path, name: str, needs: tuple[str, ...] = CHECKPOINT_FILES) -> Path | None:
    try:
        target = (checkpoints / name).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_DIR.fullmatch(target) or not _is_complete(checkpoints / target, needs):
        return None
    return checkpoints / target


def _check_complete(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if (path / CHECKPOINTS_DIR).is_dir():
        raise CheckpointError(f"{path} is a run directory; pass a step directory: latest_checkpoint({path})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory (one holding {', '.join(CHECKPOINT_FILES)})")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def _read_state_file(file: Path, map_location: Any) -> dict[str, Any]:
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"could not read {file}: {error}") from error
    version = payload.get("format_version") if isinstance(payload, dict) else None
    if version is None:
        raise CheckpointError(f"{file} has no format_version: not a smallm checkpoint")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} is checkpoint format version {version}; this smallm reads version {FORMAT_VERSION}"
        )
    return payload


def _load_weights_into(model: torch.nn.Module, file: Path) -> None:
    try:
        with safetensors.safe_open(str(file), framework="pt") as weights:
            shapes = {key: list(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
            saved_ties = json.loads((weights.metadata() or {}).get("tied", "{}"))
    except Exception as error:
        raise CheckpointError(f"could not read {file}: {error}") from error
    model_tensors = model.state_dict()
    model_ties = _find_ties(model_tensors)
    problems = _mismatches(shapes, saved_ties, model_tensors, model_ties)
    if problems:
        raise CheckpointError(f"checkpoint {file} does not match the model: {'; '.join(problems)}")
    result = model.load_state_dict(safetensors.torch.load_file(str(file)), strict=False)
    # Only the tied keys, dropped at save time, are missing: loading into their targets fills them.
    if set(result.missing_keys) != set(model_ties) or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {file} did not fill the model: {result}")


def _mismatches(
    saved_shapes: dict[str, list[int]],
    saved_ties: dict[str, str],
    model_tensors: dict[str, torch.Tensor],
    model_ties: dict[str, str],
) -> list[str]:
    expected = {key: list(t.shape) for key, t in model_tensors.items() if key not in model_ties}
    problems = []
    missing = sorted(expected.keys() - saved_shapes.keys())
    unexpected = sorted(saved_shapes.keys() - expected.keys())
    if missing:
        problems.append(f"missing keys {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {listing(unexpected)}")
    wrong_shape = [
        f"{key} (checkpoint {saved_shapes[key]}, model {shape})"
        for key, shape in expected.items()
        if key in saved_shapes and saved_shapes[key] != shape
    ]
    if wrong_shape:
        problems.append(f"shape mismatches {listing(wrong_shape)}")
    for alias in sorted(saved_ties.keys() | model_ties.keys()):
        saved, model = saved_ties.get(alias, "nothing"), model_ties.get(alias, "nothing")
        if saved != model:
            problems.append(f"{alias} is tied to {saved} in the checkpoint, to {model} in the model")
    return problems


def _config_json(config: dict[str, Any]) -> str:
    def encode_other(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    try:
        return json.dumps(config, indent=2, default=encode_other) + "\n"
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the run config cannot be written as JSON: {error}") from error


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made Python numbers and lists, which
    ``torch.load(weights_only=True)`` reads back."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value
