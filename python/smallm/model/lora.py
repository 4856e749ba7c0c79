"""LoRA and QLoRA on smallm models, through peft; adapters in peft's own format.

* :func:`apply_lora` wraps a :class:`~smallm.model.lm.SmallLM` with peft's LoRA layers (the model's module
  names are Hugging Face LLaMA's, so ``q_proj``... ``down_proj`` are the targets) and freezes the base.
* :func:`quantize_nf4` turns the block projections into NF4 tensors for QLoRA, with torchao's
  ``NF4Tensor``: blockwise absmax over blocks of 64 weights, the absmax scales themselves quantized to
  8 bits in blocks of 256 ("double quantization"). It works on CPU and CUDA alike; the frozen 4-bit
  weights are dequantized block by block inside each matmul.
* :func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors``, which
  ``peft.PeftModel.from_pretrained`` loads onto the model ``smallm-export`` writes (same keys);
  :func:`load_adapter` checks an adapter against its base before loading it, and :func:`merge_adapter`
  folds it into the base weights (``W + alpha / r * B @ A``), giving a plain model.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import safetensors.torch
import torch
from torch import nn

from smallm.errors import SmallmError
from smallm.files.atomic import write_folder_atomic

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LINEAR_TARGETS",
    "AdapterError",
    "LoraSettings",
    "adapter_files",
    "adapter_state",
    "apply_lora",
    "load_adapter",
    "merge_adapter",
    "quantize_nf4",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]

PathLike = Union[str, "os.PathLike[str]"]
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a block; ``all-linear`` targets them all (lm_head stays as it is)."""
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256


class AdapterError(SmallmError, RuntimeError):
    """An adapter cannot be made, read or applied; the message names the file or setting and why."""


@dataclass
class LoraSettings:
    """The low-rank adapters to train: rank, scale ``alpha / r``, dropout and the layers they adapt."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LINEAR_TARGETS))

    @classmethod
    def parse_targets(cls, text: str) -> list[str]:
        """``"all-linear"`` or a comma list of block layer names, checked."""
        if text.strip() == "all-linear":
            return list(LINEAR_TARGETS)
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in names if t not in LINEAR_TARGETS]
        if unknown or not names:
            raise AdapterError(
                f"--lora-targets {text!r}: {', '.join(unknown) or 'empty'} not a layer of a block; "
                f"use all-linear or some of {','.join(LINEAR_TARGETS)}"
            )
        return names

    def validate(self) -> None:
        if self.r < 1:
            raise AdapterError(f"--lora-r must be at least 1, got {self.r}")
        if self.alpha <= 0:
            raise AdapterError(f"--lora-alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        LoraSettings.parse_targets(",".join(self.targets))

    def peft_config(self, inference: bool = False) -> Any:
        peft = _peft()
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.targets),
            bias="none", inference_mode=inference,
        )  # fmt: skip

    @classmethod
    def from_run_config(cls, lora: Mapping[str, Any]) -> LoraSettings:
        """The settings recorded in the ``lora`` section of a LoRA run's ``config.json`` (no dropout:
        for applying and merging)."""
        return cls(int(lora["r"]), float(lora["alpha"]), 0.0, list(lora["targets"]))

    @classmethod
    def from_peft_config(cls, config: Mapping[str, Any], source: str) -> LoraSettings:
        if config.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: a {config.get('peft_type')} adapter; smallm applies LoRA adapters only")
        targets = config.get("target_modules")
        if isinstance(targets, str):  # peft also allows a regular expression; smallm writes lists
            raise AdapterError(f"{source}: target_modules is a pattern ({targets!r}); expected a list of names")
        settings = cls(
            r=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)), targets=sorted(targets or []),
        )  # fmt: skip
        for unsupported in ("use_dora", "use_rslora"):
            if config.get(unsupported):
                raise AdapterError(f"{source}: {unsupported} adapters are not supported by smallm-merge")
        settings.validate()
        return settings


def _peft() -> Any:
    try:
        with _quiet_torch_logs():  # peft imports torchao when it is installed
            return importlib.import_module("peft")
    except ImportError as e:
        raise AdapterError("LoRA needs the peft package: pip install 'smallm[finetune]'") from e


# ----- QLoRA: 4-bit NF4 base weights ----------------------------------------------------------------


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torchao's import registers types with torch.compile, which logs a deprecation line per type."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _nf4() -> Any:
    """torchao's NF4 module (it moved between versions)."""
    places = ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    with _quiet_torch_logs():
        for place in places:
            try:
                return importlib.import_module(place)
            except ImportError:
                continue
    raise AdapterError("QLoRA (--quantize nf4) needs torchao's NF4 tensor: pip install 'smallm[finetune]'")


def quantize_nf4(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replaces the weight of every block projection (:data:`LINEAR_TARGETS`) by a frozen NF4 tensor
    on ``device`` that dequantizes to ``dtype``, one layer at a time (the full-precision model may stay
    on the CPU); returns the bytes the quantized weights take. Double quantization needs a whole number
    of scale blocks, so a weight whose size is not a multiple of 64 * 256 stays in ``dtype`` (a warning
    names how many; real model widths are multiples)."""
    nf4 = _nf4()
    total, kept = 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LINEAR_TARGETS:
            if module.weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
                kept.append(name)
                continue
            weight = module.weight.detach().to(device, dtype)
            quantized = nf4.to_nf4(weight, NF4_BLOCK, NF4_SCALER_BLOCK)
            module.weight = nn.Parameter(quantized, requires_grad=False)
            total += _nf4_bytes(quantized)
    if kept:
        warnings.warn(
            f"{len(kept)} layer(s) ({kept[0]}, ...) hold a number of weights that is not a multiple of "
            f"{NF4_BLOCK * NF4_SCALER_BLOCK}; they stay in {dtype} instead of NF4",
            stacklevel=2,
        )
    return total


def place_frozen_base(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Moves ``model`` to ``device`` with its floating-point weights in ``dtype``, leaving NF4 weights
    as they are: ``Module.to(dtype=...)`` would make torchao dequantize them and keep a full-precision
    copy of every quantized weight, undoing QLoRA's saving. Tied weights stay tied."""
    model.to(device)
    for p in model.parameters():
        if type(p).__name__ != "NF4Tensor" and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _nf4_bytes(t: Any) -> int:
    parts = ("quantized_data", "quantized_scalers", "quantization_factor")
    return sum(getattr(t, p).numel() * getattr(t, p).element_size() for p in parts)


def is_quantized(model: nn.Module) -> bool:
    return any(type(p).__name__ == "NF4Tensor" for p in model.parameters())


# ----- LoRA -----------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, settings: LoraSettings, *, inference: bool = False) -> Any:
    """Wraps ``model`` in a peft ``PeftModel`` whose LoRA layers are injected into ``model`` itself (so
    ``model(...)`` runs with them); only the adapters train. Adapter weights are fp32 whatever the
    base's dtype."""
    settings.validate()
    peft = _peft()
    return peft.get_peft_model(model, settings.peft_config(inference), autocast_adapter_dtype=True)


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    peft = _peft()
    return {k: v.detach().to("cpu").contiguous() for k, v in peft.get_peft_model_state_dict(peft_model).items()}


def load_adapter(peft_model: Any, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads adapter ``tensors`` into ``peft_model`` after checking they fit it exactly: the same keys
    (targets and number of layers) and shapes (rank and layer widths); :class:`AdapterError` otherwise."""
    expected = {k: tuple(v.shape) for k, v in adapter_state(peft_model).items()}
    given = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = []
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) for layers the base lacks, e.g. {unexpected[0]}")
    shapes = [
        f"{k} {given[k]} vs {expected[k]}" for k in sorted(expected.keys() & given.keys()) if given[k] != expected[k]
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (adapter vs base), e.g. {shapes[0]}")
    if problems:
        raise AdapterError(f"{source}: the adapter does not match this base model: {'; '.join(problems)}")
    _peft().set_peft_model_state_dict(peft_model, dict(tensors))


def adapter_files(peft_model: Any, base: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` content and the tensors of ``adapter_model.safetensors`` of ``peft_model``,
    the layout ``peft.PeftModel.from_pretrained`` reads. ``base``: recorded as ``base_model_name_or_path``."""
    config = peft_model.peft_config["default"].to_dict()
    config.update(
        target_modules=sorted(config["target_modules"]), base_model_name_or_path=base or None,
        task_type="CAUSAL_LM", inference_mode=True,
    )  # fmt: skip
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return config, adapter_state(peft_model)


def write_adapter(directory: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Writes an adapter's two files into ``directory`` (a folder being filled atomically)."""
    safetensors.torch.save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n", encoding="utf-8")


def save_adapter(peft_model: Any, folder: PathLike, base: str = "") -> Path:
    """Writes ``folder/adapter_config.json`` and ``folder/adapter_model.safetensors`` (:func:`adapter_files`);
    the folder is written beside and renamed into place."""
    config, tensors = adapter_files(peft_model, base)
    return write_folder_atomic(
        Path(os.path.abspath(folder)), lambda directory: write_adapter(directory, config, tensors)
    )


def read_adapter(folder: PathLike) -> tuple[LoraSettings, dict[str, torch.Tensor], dict[str, Any]]:
    """The settings, tensors and raw config of a peft LoRA adapter folder."""
    folder = Path(folder)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"{folder}: not an adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{config_file}: cannot read: {e}") from e
    settings = LoraSettings.from_peft_config(config, str(config_file))
    try:
        tensors = safetensors.torch.load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types
        raise AdapterError(f"{weights_file}: cannot read: {e}") from e
    return settings, tensors, config


def merge_adapter(
    base: nn.Module, settings: LoraSettings, tensors: Mapping[str, torch.Tensor], source: str
) -> nn.Module:
    """``base`` (full precision, not quantized) with the adapter folded into its weights: a plain model
    whose outputs equal the base's with the adapter applied."""
    if is_quantized(base):
        raise AdapterError("merge into a full-precision base, not a 4-bit one: load the base checkpoint again")
    adapter = {k: v for k, v in tensors.items() if k.startswith("base_model.")}
    _replace_base_weights(base, {k: v for k, v in tensors.items() if k not in adapter}, source)
    wrapped = apply_lora(base, LoraSettings(settings.r, settings.alpha, 0.0, settings.targets), inference=True)
    load_adapter(wrapped, adapter, source)
    merged = wrapped.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def _replace_base_weights(base: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copies weights trained beside the adapter (``--lora-train-embeddings``) into the base."""
    embedding = tensors.get("model.embed_tokens.weight")  # grown for added tokens, or the same
    if embedding is not None and embedding.shape[0] > base.config.vocab_size:
        base.grow_vocab(embedding.shape[0])  # tokens were added to the base's vocabulary (ChatML's)
    own = dict(base.named_parameters(remove_duplicate=False))
    for name, tensor in tensors.items():
        if name not in own or own[name].shape != tensor.shape:
            found = tuple(own[name].shape) if name in own else "no such weight"
            raise AdapterError(
                f"{source}: the adapter's {name} {tuple(tensor.shape)} does not match this base model ({found})"
            )
        with torch.no_grad():
            own[name].copy_(tensor)
