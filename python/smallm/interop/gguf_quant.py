"""GGUF k-quants by llama.cpp's own quantizer, and the importance matrix that guides it.

smallm writes the exact fp32 file (:mod:`smallm.interop.gguf_export`) and has llama.cpp quantize it
through the ``llama-cpp-python`` bindings (``llama_model_quantize``), as ``llama-quantize`` would: no
compiler, no llama.cpp checkout. llama.cpp then applies its own rules per tensor (the ``_m`` mixes keep
some of the attention values and MLP down projections at a wider type, the output matrix at Q6_K, and
fall back to a legacy type for a matrix whose rows are not a multiple of 256 values).

An importance matrix (:func:`importance_matrix`) weighs each input column of a matrix by the mean square
of the activations that reach it on a calibration text, as llama.cpp's ``llama-imatrix`` measures it:
the quantizer then spends its precision where the activations are large.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from smallm.interop.hf_export import HFError
from smallm.model.lm import SmallLM
from smallm.text.tokenizer import Tokenizer

__all__ = ["LLAMA_CPP_TYPES", "importance_matrix", "quantize_file"]

LLAMA_CPP_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
"""The ``--dtype`` names that llama.cpp's quantizer writes, and its file types."""


def quantize_file(
    source: Path, target: Path, dtype: str, imatrix: Mapping[str, np.ndarray] | None = None, threads: int = 0
) -> None:
    """Has llama.cpp quantize the GGUF file ``source`` (fp32 or fp16) to ``target`` as ``dtype`` (a key of
    :data:`LLAMA_CPP_TYPES`), weighing columns by ``imatrix`` (tensor name -> one value per input column)
    where given. Raises :class:`~smallm.interop.hf_export.HFError` when llama-cpp-python is missing or
    llama.cpp refuses the file."""
    try:
        import llama_cpp
    except ImportError as error:
        raise HFError(
            f"--dtype {dtype} is quantized by llama.cpp itself through llama-cpp-python, which is not installed: "
            "pip install 'smallm[llamacpp]' (or export fp16/q8_0, which smallm writes alone)"
        ) from error
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[dtype])
    params.nthread = threads
    keep = []  # the ctypes buffers must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(array)
            entry.name = name.encode("utf-8")
            entry.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = array.size
        params.imatrix = entries  # the last entry's name is NULL: the end of the list
    with _quiet():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise HFError(f"llama.cpp could not quantize {source.name} to {dtype} (llama_model_quantize returned "
                      f"{status}); its log says why when run with SMALLM_LLAMA_CPP_LOG=1")  # fmt: skip


@contextmanager
def _quiet() -> Iterator[None]:
    """llama.cpp logs every tensor it quantizes, through the bindings' logger ``llama-cpp-python``; that log
    shows only with SMALLM_LLAMA_CPP_LOG=1 (errors always)."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    if os.environ.get("SMALLM_LLAMA_CPP_LOG") != "1":
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def importance_matrix(
    model: SmallLM, tokenizer: Tokenizer, text: Path, names: Mapping[str, str], max_tokens: int = 65536
) -> tuple[dict[str, np.ndarray], int]:
    """The importance matrix of ``model`` on the calibration text file ``text``: for each linear layer whose
    weight ``names`` maps to a GGUF tensor name, the mean square of its inputs per input column, over the
    text's first ``max_tokens`` tokens in windows of the model's context (at most 512, as ``llama-imatrix``).
    Returns the matrix and the number of tokens it saw. Raises
    :class:`~smallm.interop.hf_export.HFError` naming the file when it cannot be read or holds no text."""
    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HFError(f"--imatrix-data {text}: cannot be read as UTF-8 text ({error})") from error
    ids = tokenizer.prompt_prefix + tokenizer.encode_ordinary(content)
    if len(ids) < 2:
        raise HFError(f"--imatrix-data {text}: holds no text to calibrate on")
    ids = ids[:max_tokens]
    window = min(model.config.max_seq_len, 512)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        tensor = names.get(f"{module_name}.weight")
        if tensor is None or not isinstance(module, nn.Linear):
            continue

        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: object, tensor: str = tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[tensor] = sums.get(tensor, 0) + x.square().sum(0)
            counts[tensor] = counts.get(tensor, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(record))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(ids), window):
                model(torch.tensor([ids[start : start + window]], device=device))
    finally:
        for hook in hooks:
            hook.remove()
    matrix = {name: (total / counts[name]).float().cpu().numpy() for name, total in sums.items()}
    return matrix, len(ids)
