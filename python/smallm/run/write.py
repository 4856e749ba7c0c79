"""Writing a run of weights only: what ``smallm-import`` and ``smallm-merge`` make.

Such a run holds one checkpoint (``checkpoints/step_00000000``: the weights and ``config.json``, no
optimizer state), the run's ``config.json`` and its tokenizer, written as one atomic folder to a
destination claimed by the rule every writer follows (:func:`claim_run`; :mod:`smallm.files.destination`).
Every command that opens a model opens it (:func:`smallm.run.load.load_model`), and ``smallm-train
--init-from`` starts from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

from torch import nn

from smallm.files.destination import Destination, claim
from smallm.model.lora import ADAPTER_CONFIG, AdapterError, LoraSettings, merge_adapter, read_adapter
from smallm.model.reward import RewardModel
from smallm.run.checkpoint import CheckpointError, TrainingState, load_weights, save_checkpoint
from smallm.run.layout import RUN, write_run_config
from smallm.run.load import check_base, find_tokenizer, load_model, read_config, resolve_checkpoint, run_kind
from smallm.text.tokenizer import Tokenizer

__all__ = ["claim_run", "merge_run", "write_run"]

PathLike = Union[str, "os.PathLike[str]"]


def claim_run(out: PathLike, *, force: bool, command: str, inputs: Iterable[PathLike | None]) -> Destination:
    """``out`` checked and locked for a new run (:func:`smallm.files.destination.claim` with
    :data:`smallm.run.layout.RUN`), before any model is loaded."""
    return claim(out, RUN, force=force, command=command, inputs=inputs)


def write_run(
    out: PathLike | Destination,
    model: nn.Module,
    tokenizer: Tokenizer | None,
    config: dict[str, Any],
    *,
    force: bool = False,
    command: str = "smallm",
    inputs: Iterable[PathLike | None] = (),
) -> Path:
    """Writes the run of one checkpoint of ``model``'s weights, ``config`` as its ``config.json`` and the
    tokenizer, atomically, at ``out``: a destination :func:`claim_run` claimed, or a path claimed here (with
    ``force``, ``command`` and ``inputs`` as :func:`claim_run` takes them). Returns its path."""

    def fill(run: Path) -> None:
        save_checkpoint(run, model, None, None, None, TrainingState(step=0, tokens_seen=0), config)
        write_run_config(run, config)
        if tokenizer is not None:
            tokenizer.save(run)

    if isinstance(out, Destination):
        return out.write_folder(fill)
    with claim_run(out, force=force, command=command, inputs=inputs) as destination:
        return destination.write_folder(fill)


def merge_run(source: PathLike, out: PathLike, *, base: PathLike | None = None, force: bool = False) -> Path:
    """Writes a run directory ``out`` holding the base with the adapter of ``source`` merged in.
    ``source``: a LoRA run or checkpoint of ``smallm-sft``, ``smallm-dpo`` or ``smallm-rm`` (its base is the
    one it names, unless ``base`` is given; a reward model's stays one), or a peft adapter folder (then
    ``base`` is required unless the folder's ``base_model_name_or_path`` is a local smallm run). The
    tokenizer comes from the source run, else the base."""
    source = Path(source)
    sections: dict[str, Any] = {}
    if (source / ADAPTER_CONFIG).is_file():
        settings, tensors, raw = read_adapter(source)
        named = raw.get("base_model_name_or_path")
        base = base or (named if named and Path(named).exists() else None)
        if base is None:
            raise AdapterError(f"{source}: name the smallm checkpoint the adapter was trained on with --base")
        with claim_run(out, force=force, command="smallm-merge", inputs=[source, base]) as destination:
            model, tokenizer, _ = load_model(base)
            merged = merge_adapter(model, settings, tensors, str(source))
            return write_run(destination, merged, tokenizer, _merged_config(merged, source, base, sections))
    checkpoint = resolve_checkpoint(source)
    config = read_config(checkpoint)
    if "lora" not in config:
        raise AdapterError(f"{checkpoint}: not a LoRA run (its config.json has no lora section) nor an adapter folder")
    named_base = config["lora"]["base"]
    if base is not None:
        check_base(config["lora"], resolve_checkpoint(base), checkpoint, chosen=True)
    sections = {key: config[key] for key in ("finetune",) if key in config}
    with claim_run(out, force=force, command="smallm-merge", inputs=[source, base or named_base]) as destination:
        if base is None:
            merged, tokenizer, _ = load_model(checkpoint)  # the adapter merged into the base it names
        else:
            merged, tokenizer, _ = load_model(base)
            with contextlib.suppress(CheckpointError):  # the run's own tokenizer, else the base's
                tokenizer = find_tokenizer(checkpoint, config)
            if run_kind(config) == "reward" and not isinstance(merged, RewardModel):
                merged = RewardModel.from_lm(merged)  # the head comes from the adapter
            settings = LoraSettings.from_run_config(config["lora"])
            merged = merge_adapter(merged, settings, load_weights(checkpoint), str(checkpoint))
        return write_run(destination, merged, tokenizer, _merged_config(merged, source, base or named_base, sections))


def _merged_config(model: nn.Module, adapter: Path, base: PathLike, sections: dict[str, Any]) -> dict[str, Any]:
    return {
        "train": {},
        "model": dataclasses.asdict(model.config),
        "merged_from": {"adapter": str(adapter.absolute()), "base": str(Path(base).absolute())},
        **sections,
    }
