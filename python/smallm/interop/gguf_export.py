"""GGUF export: a checkpoint as one file that llama.cpp (and Ollama, LM Studio) runs, written with ``gguf``.

:func:`export_gguf` writes the llama.cpp architecture the model's shape is: ``llama`` (Llama, Mistral and
smallm's own), ``qwen2`` (q/k/v biases) or ``qwen3`` (QK-norm):

* metadata: context length, width, layers, MLP width, heads and KV heads, head width, rope theta and
  RMSNorm epsilon, vocabulary size and the file type;
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output_norm``, ``output``;
  no ``output`` when the embeddings are tied, which llama.cpp then reuses; ``blk.N.attn_q.bias`` for
  Qwen2, ``blk.N.attn_q_norm`` for Qwen3; Llama 3.1's rotary scaling as the ``rope_freqs`` tensor of
  per-frequency divisors, as llama.cpp's own converter writes it). For ``llama`` the query and key rows are
  reordered from Hugging Face's rotary layout (the two halves of each head) to GGML's (interleaved
  pairs); ``qwen2`` and ``qwen3`` rotate halves as Hugging Face does. Norms and biases stay fp32;
  matrices take ``dtype``: ``fp32``, ``fp16``, ``bf16`` or ``q8_0`` (blocks of 32 with an fp16 scale; a
  matrix whose rows are not a multiple of 32 stays fp16), written by smallm; or ``q4_0``, ``q4_k_m``,
  ``q5_k_m``, ``q6_k``, quantized from the fp32 file by llama.cpp's own quantizer
  (:mod:`smallm.interop.gguf_quant`), optionally guided by an importance matrix from a calibration text;
* the tokenizer (:mod:`smallm.interop.gguf_vocab`);
* beside the file, an Ollama ``Modelfile`` (:mod:`smallm.interop.modelfile`).

A LoRA run is merged into its base first (:func:`smallm.run.load.load_model`). What llama.cpp's
architectures do not describe (QK-norm with biases, rotary scaling on Qwen shapes, activations other than
SiLU, reward models) is refused naming the setting.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from smallm.files.atomic import write_failure
from smallm.files.destination import Artifact, DestinationError, claim
from smallm.interop.gguf_quant import LLAMA_CPP_TYPES, importance_matrix, quantize_file
from smallm.interop.gguf_vocab import pre_tokenizer, write_tokenizer
from smallm.interop.hf_export import HFError
from smallm.interop.modelfile import MODELFILE, MODELFILE_NAME, modelfile_text
from smallm.model.config import ModelConfig
from smallm.model.layers import llama3_frequencies
from smallm.model.lm import SmallLM
from smallm.run.load import inputs_of, load_model, read_config, resolve_checkpoint, run_kind

__all__ = [
    "GGUF_DTYPES", "GGUF_FILE", "architecture", "export_gguf", "interleave_rotary", "is_gguf_file", "rope_factors",
    "tensor_names",
]  # fmt: skip

PathLike = Union[str, "os.PathLike[str]"]
GGUF_MAGIC = b"GGUF"
SMALLM_DTYPES = ("fp32", "fp16", "bf16", "q8_0")
GGUF_DTYPES = (*SMALLM_DTYPES, *LLAMA_CPP_TYPES)
"""The ``--dtype`` names of a GGUF file's matrices: smallm writes the first four, llama.cpp quantizes the rest."""
_FILE_TYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
_LAYER_PARTS = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
}  # fmt: skip


def export_gguf(
    checkpoint_path: PathLike,
    out_file: PathLike,
    *,
    dtype: str = "fp32",
    force: bool = False,
    prefer: str = "latest",
    allow_other_pattern: bool = False,
    imatrix_data: PathLike | None = None,
    modelfile: bool = True,
) -> Path:
    """Writes the checkpoint (a checkpoint directory, or a run's ``prefer`` = latest or best one) as the
    GGUF file ``out_file`` and, with ``modelfile``, an Ollama ``Modelfile`` beside it; returns the file's
    path. ``imatrix_data``: a calibration text for llama.cpp's quantizer (the llama.cpp types only). Both
    destinations follow the rule of :mod:`smallm.files.destination`: an earlier GGUF file (Modelfile
    written by smallm) is replaced only with ``force``, any other file never; each is written beside
    and renamed into place. Raises :class:`~smallm.interop.hf_export.HFError` naming what the file cannot
    hold (a reward model, an architecture llama.cpp does not describe)."""
    if dtype not in GGUF_DTYPES:
        raise HFError(f"dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if imatrix_data is not None and dtype not in LLAMA_CPP_TYPES:
        raise HFError(f"--imatrix-data guides llama.cpp's quantizer: it goes with --dtype {', '.join(LLAMA_CPP_TYPES)}")
    checkpoint = resolve_checkpoint(checkpoint_path, prefer=prefer)
    if run_kind(read_config(checkpoint)) == "reward":
        raise HFError(
            f"{checkpoint} is a reward model (LlamaForSequenceClassification), which llama.cpp does not run: "
            "export it to transformers (smallm-export --format hf)"
        )
    out = Path(out_file)
    inputs = [*inputs_of(checkpoint), *([Path(imatrix_data)] if imatrix_data is not None else [])]
    with ExitStack() as stack:
        destination = stack.enter_context(claim(out, GGUF_FILE, force=force, command="smallm-export", inputs=inputs))
        side = None
        if modelfile:
            try:
                side = stack.enter_context(
                    claim(out.parent / MODELFILE_NAME, MODELFILE, force=force, command="smallm-export", inputs=inputs)
                )
            except DestinationError as error:
                raise DestinationError(f"{error} (or pass --no-modelfile to write the GGUF file alone)") from error
        model, tokenizer, _ = load_model(checkpoint)
        arch = architecture(model.config)
        pre = None if tokenizer.sentencepiece else pre_tokenizer(tokenizer, allow_other_pattern)
        matrix = None
        if imatrix_data is not None:
            matrix, _ = importance_matrix(model, tokenizer, Path(imatrix_data), tensor_names(model.config))

        def write(path: Path, kind: str) -> None:
            import gguf

            writer = gguf.GGUFWriter(str(path), arch)
            _write_metadata(writer, model.config, kind)
            write_tokenizer(writer, model.config.vocab_size, tokenizer, pre)
            for name, array, raw in _tensors(model, kind, arch):
                writer.add_tensor(name, array, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        def fill(path: Path) -> None:
            if dtype in SMALLM_DTYPES:
                write(path, dtype)
                return
            source = path.with_name(f".{out.name}.fp32.tmp-{os.getpid()}")
            try:
                write(source, "fp32")
                quantize_file(source, path, dtype, matrix)
            finally:
                source.unlink(missing_ok=True)

        try:
            written = destination.write_file(fill)
            if side is not None:
                text = modelfile_text(out.name, tokenizer, model.config.max_seq_len)
                side.write_file(lambda path: path.write_text(text, encoding="utf-8"))
        except HFError:
            raise
        except Exception as error:  # gguf and the OS report a full disk in their own words
            raise HFError(write_failure(destination.path, error)) from error
        return written


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (it starts with the format's magic)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == GGUF_MAGIC
    except OSError:
        return False


GGUF_FILE = Artifact("a GGUF file", is_gguf_file)
"""A GGUF export as an output, for :func:`smallm.files.destination.claim`."""


def architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for a model of this shape: ``qwen3`` with QK-norm, ``qwen2`` with q/k/v biases,
    else ``llama``; raises :class:`~smallm.interop.hf_export.HFError` naming a setting none of them has."""
    arch = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    refusals = [
        (config.qk_norm and config.qkv_bias, "qk_norm and qkv_bias together"),
        (config.rope_scaling is not None and arch != "llama", "rope_scaling (Llama 3.1's) on a Qwen shape"),
        (config.hidden_act != "silu", f"hidden_act {config.hidden_act!r}"),
    ]
    for refused, what in refusals:
        if refused:
            raise HFError(
                f"llama.cpp's {arch} architecture has no {what}; export to transformers (smallm-export --format hf) "
                "for the runtimes that take it"
            )
    return arch


def rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama 3.1's rotary scaling as llama.cpp holds it (``rope_freqs.weight``): what each rotary frequency
    is divided by, the unscaled frequency over smallm's scaled one."""
    assert config.rope_scaling is not None
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).double() / config.head_dim)
    return (inv_freq / llama3_frequencies(inv_freq, config.rope_scaling)).float().numpy()


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """smallm's state-dict key -> llama.cpp's tensor name, for every weight the model has (the head only when
    untied), in the file's order."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(config.n_layer):
        names.update({f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in _LAYER_PARTS.items()})
    names["model.norm.weight"] = "output_norm.weight"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    return names


def _write_metadata(writer: Any, c: ModelConfig, dtype: str) -> None:
    import gguf

    writer.add_name("smallm model")
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model: SmallLM, dtype: str, arch: str) -> list[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, data, GGML type) of every weight, in the file's order."""
    import gguf

    c = model.config
    state = {key: t.detach().to("cpu", torch.float32) for key, t in model.state_dict().items()}
    names = {key: name for key, name in tensor_names(c).items() if key in state}
    unknown = sorted(set(state) - set(names) - ({"lm_head.weight"} if c.tie_embeddings else set()))
    if unknown:
        raise HFError(f"the GGUF export has no place for {', '.join(unknown)}")
    out = []
    if c.rope_scaling is not None:
        out.append(("rope_freqs.weight", rope_factors(c), gguf.GGMLQuantizationType.F32))
    for key, name in names.items():
        tensor = state[key]
        if arch == "llama" and key.endswith("q_proj.weight"):
            tensor = interleave_rotary(tensor, c.n_head)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            tensor = interleave_rotary(tensor, c.n_kv_head)
        out.append((name, *_encode(tensor.numpy(), dtype)))
    return out


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a query or key projection reordered from rotate-half pairs (i, i + d/2) to adjacent
    pairs (2i, 2i + 1) within each head, GGML's rotary layout for the llama architecture."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    import gguf
    from gguf.quants import quantize

    kinds = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "fp32":
        return np.ascontiguousarray(array, dtype=np.float32), kinds.F32
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        return quantize(array, kinds.Q8_0), kinds.Q8_0
    if dtype == "bf16":
        return quantize(array, kinds.BF16), kinds.BF16
    return np.ascontiguousarray(array, dtype=np.float16), kinds.F16
