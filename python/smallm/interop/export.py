"""One export entry: a run written for the ecosystem in the form that fits what it is.

:func:`export_run` reads what the checkpoint holds and dispatches:

* a language model: to its ``transformers`` class (``LlamaForCausalLM``, ``Qwen2/3ForCausalLM``,
  ``MistralForCausalLM``; :func:`smallm.interop.hf_export.export_hf`) or to a GGUF file for llama.cpp
  (:func:`smallm.interop.gguf_export.export_gguf`);
* a reward model (``smallm-rm``): to ``LlamaForSequenceClassification`` (or the Qwen/Mistral one); GGUF
  refuses it by name, since llama.cpp runs language models;
* a LoRA run: merged into the base it names (either format), or with ``adapter=True`` as the adapter
  alone in peft's layout (``adapter_config.json``, ``adapter_model.safetensors``), which
  ``peft.PeftModel.from_pretrained`` puts on the base's export.

Every destination follows the rule of :mod:`smallm.files.destination`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch

from smallm.files.destination import claim
from smallm.interop.gguf_export import GGUF_DTYPES, export_gguf
from smallm.interop.hf_export import DTYPES, HF_FOLDER, HFError, export_hf
from smallm.model.lora import LoraSettings, adapter_files, apply_lora, load_adapter, write_adapter
from smallm.run.checkpoint import load_weights
from smallm.run.load import inputs_of, load_model, read_config, resolve_checkpoint, run_kind

__all__ = ["FORMATS", "Exported", "export_run"]

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = ("hf", "gguf")
"""``--format``: a transformers folder, or one GGUF file."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote."""

    path: Path
    checkpoint: Path
    what: str
    """``"language model"``, ``"reward model"`` or ``"adapter"``."""


def export_run(
    source: PathLike,
    out: PathLike,
    *,
    format: str = "hf",
    dtype: str | torch.dtype | None = None,
    prefer: str = "latest",
    adapter: bool = False,
    force: bool = False,
    allow_other_pattern: bool = False,
    imatrix_data: PathLike | None = None,
    modelfile: bool = True,
) -> Exported:
    """Exports the checkpoint ``source`` names (a checkpoint, or a run's ``prefer`` = latest or best one) to
    ``out`` as the module docstring says. ``dtype``: the weights' type (fp32, bf16, fp16; for GGUF also
    q8_0, q4_0, q4_k_m, q5_k_m, q6_k). GGUF only: ``allow_other_pattern``, a tokenizer whose split pattern
    llama.cpp lacks is written with its default one (and a warning); ``imatrix_data``, a calibration text
    for llama.cpp's quantizer; ``modelfile``, an Ollama ``Modelfile`` beside the file. Raises
    :class:`~smallm.interop.hf_export.HFError` naming what cannot be exported that way."""
    if format not in FORMATS:
        raise HFError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    checkpoint = resolve_checkpoint(source, prefer=prefer)
    config = read_config(checkpoint)
    what = "reward model" if run_kind(config) == "reward" else "language model"
    if adapter:
        if "lora" not in config:
            raise HFError(f"{checkpoint} is not a LoRA run: it has no adapter to export on its own (drop --adapter)")
        if format != "hf" or dtype not in (None, "fp32", torch.float32):
            raise HFError("--adapter writes the adapter in peft's layout, fp32: drop --format gguf and --dtype")
        return Exported(export_adapter(checkpoint, out, force=force), checkpoint, "adapter")
    if format == "gguf":
        chosen = dtype if isinstance(dtype, str) else "fp32" if dtype is None else str(dtype)
        written = export_gguf(checkpoint, out, dtype=chosen, force=force, allow_other_pattern=allow_other_pattern,
                              imatrix_data=imatrix_data, modelfile=modelfile)  # fmt: skip
        return Exported(written, checkpoint, what)
    if dtype in GGUF_DTYPES and dtype not in DTYPES:
        raise HFError(f"--dtype {dtype} is for --format gguf; a transformers folder takes fp32, bf16 or fp16")
    if imatrix_data is not None:
        raise HFError("--imatrix-data guides llama.cpp's quantizer: it goes with --format gguf")
    return Exported(export_hf(checkpoint, out, force=force, dtype=dtype), checkpoint, what)


def export_adapter(checkpoint: Path, out: PathLike, *, force: bool = False) -> Path:
    """Writes the adapter of the LoRA run ``checkpoint`` as a peft adapter folder ``out`` (checked against the
    base it names). Refused when the run trained weights in full beside the adapter (the embeddings, a
    reward model's head), which a peft adapter folder cannot carry: export it merged instead."""
    config = read_config(checkpoint)
    lora = config["lora"]
    tensors = load_weights(checkpoint)
    full = sorted(name for name in tensors if not name.startswith("base_model."))
    if full:
        raise HFError(
            f"{checkpoint} trained {', '.join(full)} in full beside its adapter, which a peft adapter folder "
            "cannot hold: export the merged model (drop --adapter)"
        )
    with claim(out, HF_FOLDER, force=force, command="smallm-export", inputs=inputs_of(checkpoint)) as destination:
        base, _, _ = load_model(lora["base"])
        peft_model = apply_lora(base, LoraSettings.from_run_config(lora), inference=True)
        load_adapter(peft_model, tensors, str(checkpoint))
        adapter_config, weights = adapter_files(peft_model, base=str(lora["base"]))
        return destination.write_folder(lambda folder: write_adapter(folder, adapter_config, weights))
