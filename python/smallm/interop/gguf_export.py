"""GGUF export: a checkpoint as one file that llama.cpp (and Ollama, LM Studio) runs, written with ``gguf``.

:func:`export_gguf` writes the ``llama`` architecture:

* metadata: context length, width, layers, MLP width, heads and KV heads, head width, rope theta and
  RMSNorm epsilon, vocabulary size and the file type;
* tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q`` ... ``output_norm``, ``output``;
  no ``output`` when the embeddings are tied, which llama.cpp then reuses). The query and key rows are
  reordered from Hugging Face's rotary layout (the two halves of each head) to GGML's (interleaved
  pairs), as llama.cpp's own converter does. Norms stay fp32; matrices take ``dtype``: ``fp32``,
  ``fp16``, ``bf16`` or ``q8_0`` (blocks of 32 with an fp16 scale; a matrix whose rows are not a
  multiple of 32 stays fp16);
* the tokenizer as a byte-level BPE (``gpt2`` model): every token's string in the byte-to-unicode
  form of ``tokenizer.json``, the merges, token types (special tokens as control tokens, the added
  tokens that are not special as user-defined, the embedding's padding rows as unused ``[PADn]``),
  BOS (the document start), EOS, end of turn (``<|im_end|>``), padding, whether to add the BOS, and the
  chat template (the model's own, else ChatML); a SentencePiece-style tokenizer (Llama 2's kind) as
  llama.cpp's ``llama`` vocabulary instead: its ``▁`` pieces, byte tokens, the unknown token, the prefix
  space, and scores that make llama.cpp join pieces in the order of the merges.

llama.cpp does not read the split regex: it picks a built-in pre-tokenizer by name. smallm's default
(GPT-4's pattern) and Llama 3's are its ``llama-bpe``, GPT-2's its ``gpt-2``, Qwen2's its ``qwen2``.
A tokenizer with another pattern is refused, or with ``allow_other_pattern`` written with llama.cpp's
``default`` pre-tokenizer and a warning that llama.cpp will split text differently. A LoRA run is merged
into its base first (:func:`smallm.run.load.load_model`). Architectures the ``llama`` GGUF does not
describe (QK-norm, q/k/v biases, rotary scaling, other activations) are refused naming the setting.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from smallm.files.atomic import write_failure
from smallm.files.destination import Artifact, claim
from smallm.interop.hf_export import HFError, tokenizer_json
from smallm.model.lm import SmallLM
from smallm.run.load import inputs_of, load_model, read_config, resolve_checkpoint, run_kind
from smallm.text.chat import CHAT_TEMPLATE, IM_END, IM_START
from smallm.text.tokenizer import Tokenizer
from smallm.text.training import GPT2_PATTERN, GPT4_PATTERN

__all__ = ["GGUF_DTYPES", "GGUF_FILE", "PRE_TOKENIZERS", "export_gguf", "interleave_rotary", "is_gguf_file"]

PathLike = Union[str, "os.PathLike[str]"]
GGUF_MAGIC = b"GGUF"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
GGUF_DTYPES = ("fp32", "fp16", "bf16", "q8_0")
"""The ``--dtype`` names of a GGUF file's matrices."""

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT4_PATTERN: "llama-bpe",
    _CONTRACTIONS + r"\p{N}{1,3}" + _REST: "llama-bpe",  # Llama 3's tokenizer.json writes it this way
    GPT2_PATTERN: "gpt-2",
    _CONTRACTIONS + r"\p{N}" + _REST: "qwen2",
}
"""Split patterns and the llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text the same way."""


def export_gguf(
    checkpoint_path: PathLike,
    out_file: PathLike,
    *,
    dtype: str = "fp32",
    force: bool = False,
    prefer: str = "latest",
    allow_other_pattern: bool = False,
) -> Path:
    """Writes the checkpoint (a checkpoint directory, or a run's ``prefer`` = latest or best one) as the
    GGUF file ``out_file`` and returns its path. The destination follows the rule of
    :mod:`smallm.files.destination`: an earlier GGUF file is replaced only with ``force``, any other file
    never; the file is written beside it and renamed into place. Raises
    :class:`~smallm.interop.hf_export.HFError` naming what the file cannot hold (a reward model, an
    architecture the ``llama`` GGUF does not describe)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise HFError(f"dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    checkpoint = resolve_checkpoint(checkpoint_path, prefer=prefer)
    if run_kind(read_config(checkpoint)) == "reward":
        raise HFError(
            f"{checkpoint} is a reward model (LlamaForSequenceClassification), which llama.cpp does not run: "
            "export it to transformers (smallm-export --format hf)"
        )
    with claim(out_file, GGUF_FILE, force=force, command="smallm-export", inputs=inputs_of(checkpoint)) as destination:
        model, tokenizer, _ = load_model(checkpoint)
        _check_architecture(model)
        pre = None if tokenizer.sentencepiece else _pre_tokenizer(tokenizer, allow_other_pattern)

        def fill(path: Path) -> None:
            writer = gguf.GGUFWriter(str(path), "llama")
            _write_metadata(writer, model, dtype)
            _write_tokenizer(writer, model, tokenizer, pre)
            for name, array, kind in _tensors(model, dtype):
                writer.add_tensor(name, array, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        try:
            return destination.write_file(fill)
        except Exception as error:  # gguf and the OS report a full disk in their own words
            raise HFError(write_failure(destination.path, error)) from error


def is_gguf_file(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (it starts with the format's magic)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == GGUF_MAGIC
    except OSError:
        return False


GGUF_FILE = Artifact("a GGUF file", is_gguf_file)
"""A GGUF export as an output, for :func:`smallm.files.destination.claim`."""


def _check_architecture(model: SmallLM) -> None:
    c = model.config
    refusals = [
        (c.qk_norm, "qk_norm (Qwen3's QK-norm)"),
        (c.qkv_bias, "qkv_bias (Qwen2's biases)"),
        (c.rope_scaling is not None, "rope_scaling (Llama 3.1's)"),
        (c.hidden_act != "silu", f"hidden_act {c.hidden_act!r}"),
    ]
    for refused, what in refusals:
        if refused:
            raise HFError(
                f"the GGUF export writes the llama architecture, which has no {what}; export to transformers "
                "(smallm-export --format hf) and convert that with llama.cpp's own script"
            )


def _pre_tokenizer(tokenizer: Tokenizer, allow_other: bool) -> str:
    name = PRE_TOKENIZERS.get(tokenizer.pattern)
    if name is not None:
        return name
    message = (
        f"llama.cpp does not run a tokenizer's regex but one of its built-in pre-tokenizers, and none splits "
        f"like this tokenizer's pattern {tokenizer.pattern!r} (those it has: smallm's gpt4 and gpt2 presets, "
        "Llama 3's and Qwen2's)"
    )
    if not allow_other:
        raise HFError(f"{message}; pass --force to write it with llama.cpp's default pre-tokenizer anyway")
    warnings.warn(f"{message}: written with llama.cpp's default pre-tokenizer, which splits text differently, "
                  "so llama.cpp's token ids will differ from smallm's on some text", stacklevel=3)  # fmt: skip
    return "default"


def _write_metadata(writer: Any, model: SmallLM, dtype: str) -> None:
    import gguf

    c = model.config
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
    kinds = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, kinds[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, model: SmallLM, tokenizer: Tokenizer, pre: str | None) -> None:
    import gguf

    document = json.loads(tokenizer_json(tokenizer))
    size = model.config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(size)]
    kinds = [gguf.TokenType.UNUSED] * size
    for text, i in document["model"]["vocab"].items():
        tokens[i], kinds[i] = text, gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    if tokenizer.sentencepiece:
        for i, text in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(text):
                kinds[i] = gguf.TokenType.BYTE
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_prepends_space(tokenizer))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    for added in document.get("added_tokens") or []:
        i = added["id"]
        tokens[i] = added["content"]
        kinds[i] = gguf.TokenType.CONTROL if added.get("special", True) else gguf.TokenType.USER_DEFINED
    unknown = document["model"].get("unk_token")
    if tokenizer.sentencepiece and unknown is not None:
        kinds[document["model"]["vocab"][unknown]] = gguf.TokenType.UNKNOWN
        writer.add_unk_token_id(document["model"]["vocab"][unknown])
    writer.add_token_list(tokens)
    writer.add_token_types([int(k) for k in kinds])
    writer.add_token_merges(merges)
    roles, specials = tokenizer.roles, tokenizer.special_tokens
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_add_bos_token(bool(tokenizer.prompt_prefix))
    writer.add_add_eos_token(False)
    if roles.eos is not None:
        writer.add_eos_token_id(specials[roles.eos])
    if IM_END in specials:
        writer.add_eot_token_id(specials[IM_END])
    pad = roles.extra.get("pad_token", roles.eos)
    if pad is not None and pad in specials:
        writer.add_pad_token_id(specials[pad])
    template = roles.chat_template
    if template is None and IM_START in specials and IM_END in specials:
        template = CHAT_TEMPLATE
    if template is not None:
        writer.add_chat_template(template)


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """A score per token for llama.cpp's SentencePiece tokenizer, which joins the adjacent pair whose joined
    text is the vocabulary token of highest score: minus the rank of the merge that makes the token, so that it
    joins in the order of the merges, as ``tokenizers`` does. Tokens no merge makes (characters, bytes,
    special tokens) score 0; llama.cpp never reaches them by joining."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _prepends_space(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer puts a ``▁`` in front of a text (llama.cpp's ``add_space_prefix``). llama.cpp
    then puts it in front of every text, and of the text after each special token, as SentencePiece itself
    and the ``Prepend`` normalizer of Llama 2's file do; a ``Metaspace`` pre-tokenizer puts none before a
    text that starts with a space, and with ``prepend_scheme: first`` none after a special token. Such a
    tokenizer is written with a warning saying so."""

    def spelled(text: str) -> bytes:
        return b"".join(tokenizer.token_bytes(i) for i in tokenizer.encode_ordinary(text))

    prepends = spelled("x") == b" x"
    if prepends and spelled(" x") == b" x":
        warnings.warn("llama.cpp puts a space (▁) in front of every text and after every special token, which "
                      "this tokenizer (a Metaspace pre-tokenizer) does not do before a text that starts with a "
                      "space (nor, with prepend_scheme 'first', after a special token): llama.cpp's ids differ "
                      "from smallm's on such text", stacklevel=4)  # fmt: skip
    return prepends


def _tensors(model: SmallLM, dtype: str) -> list[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, data, GGML type) of every weight, in the file's order."""
    c = model.config
    state = {key: t.detach().to("cpu", torch.float32) for key, t in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c.tie_embeddings:
        names["lm_head.weight"] = "output.weight"
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for i in range(c.n_layer):
        for ours, theirs in parts.items():
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    unknown = sorted(set(state) - set(names) - ({"lm_head.weight"} if c.tie_embeddings else set()))
    if unknown:
        raise HFError(f"the GGUF export has no place for {', '.join(unknown)}")
    out = []
    for key, name in names.items():
        tensor = state[key]
        if key.endswith("q_proj.weight"):
            tensor = interleave_rotary(tensor, c.n_head)
        elif key.endswith("k_proj.weight"):
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
