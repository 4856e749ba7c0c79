"""Hugging Face export: a checkpoint as a ``transformers`` LLaMA folder (Qwen3 with QK-norm, Qwen2 with
q/k/v biases).

:func:`export_hf` writes a folder that ``AutoModelForCausalLM.from_pretrained`` loads as ``LlamaForCausalLM``
and ``AutoTokenizer.from_pretrained`` as a fast tokenizer, without smallm:

* ``config.json``: the LLaMA config. The rotary base is written as the installed ``transformers`` reads
  it: ``rope_parameters`` (``{"rope_type": "default", "rope_theta": ...}``) from version 5 on,
  ``rope_theta`` and ``rope_scaling: null`` before; the dtype as ``dtype`` (5) or ``torch_dtype`` (4).
  Without ``transformers`` installed both forms are written; each version ignores the other's keys.
  ``vocab_size`` is the model's, which may exceed the tokenizer's (the trainer pads the embedding table
  to a multiple of 64); ``transformers`` accepts a tokenizer smaller than the embedding.
* ``model.safetensors``: the state dict, whose keys are already Hugging Face's. With tied embeddings only
  ``model.embed_tokens.weight`` is stored and ``transformers`` ties ``lm_head`` to it on load.
* ``generation_config.json``: smallm's sampling defaults (sampling, temperature 0.8, top-k 50), stopping
  at ``<|endoftext|>`` or ``<|im_end|>``, with the padding ids past the tokenizer in ``suppress_tokens``
  (never generated, as in smallm's own sampling). No ``max_length``: transformers warns at every call
  that passes ``max_new_tokens`` when there is one (without it: 20 new tokens unless told otherwise).
* ``tokenizer.json`` (smallm's own file, already in the ``tokenizers`` format), ``tokenizer_config.json``
  (``PreTrainedTokenizerFast``; ``<|endoftext|>`` as BOS, EOS and padding; the ChatML ``chat_template``),
  ``special_tokens_map.json`` and a short ``README.md`` model card. The tokenizer adds ``<|endoftext|>``
  in front of a text by default (a ``TemplateProcessing`` post-processor and ``add_bos_token``), as
  LLaMA tokenizers add their BOS: every training document starts with it and ``smallm-generate``
  prepends it, so ``model.generate``, pipelines and lm-evaluation-harness continue the context smallm
  does. ``add_special_tokens=False`` gives the ids of the text alone (:meth:`smallm.Tokenizer.encode`'s),
  and ``apply_chat_template``, which passes it, gives exactly smallm's ChatML ids. A tokenizer trained
  elsewhere (an imported model's) is written as it was, with its own post-processor, and its roles
  (:mod:`smallm.roles`: BOS, EOS, padding, stop ids, chat template) fill these files instead.

:mod:`smallm.hf_import` reads such a folder back as a smallm run; :mod:`smallm.hub` uploads it. The
ChatML renderers of :mod:`smallm.chat` are re-exported here beside the template that matches them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any, Union

import safetensors
import safetensors.torch
import torch

from smallm.chat import IM_END, IM_START, chatml_ids, render_chatml
from smallm.errors import SmallmError
from smallm.files import check_destination, write_folder_atomic
from smallm.model import ModelConfig, SmallLM
from smallm.runs import load_model
from smallm.tokenizer import Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DTYPES",
    "HFError",
    "chatml_ids",
    "export_hf",
    "render_chatml",
]

PathLike = Union[str, "os.PathLike[str]"]
EOT = "<|endoftext|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The ``--dtype`` names of the weight types an export can have."""


class HFError(SmallmError, RuntimeError):
    """An export, import or push could not be done; the message says which file or setting, and why."""


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The Jinja form of :func:`smallm.chat.render_chatml`: the export's ``chat_template``. Hugging Face's
``apply_chat_template`` tokenizes its text with every special token string recognized, while
:func:`smallm.chat.chatml_ids` encodes contents as ordinary text: they agree on contents without
special token strings."""


# ----- export -----------------------------------------------------------------------------------------


def export_hf(
    checkpoint_path: PathLike,
    out_dir: PathLike,
    *,
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    prefer: str = "latest",
) -> Path:
    """Writes the checkpoint (a checkpoint directory, or a run directory's ``prefer`` = latest or best
    one) as a Hugging Face LLaMA folder ``out_dir`` and returns its path. ``dtype``: the weights' type
    (``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``; default: as loaded, fp32). An existing
    non-empty ``out_dir`` is replaced only with ``force``; the folder is written beside it and renamed
    into place, so it is never half written."""
    out = Path(os.path.abspath(out_dir))
    weights_dtype = _resolve_dtype(dtype)
    check_destination(out, force, source=checkpoint_path)
    model, tokenizer, _ = load_model(checkpoint_path, prefer=prefer)
    weights_dtype = weights_dtype or model.lm_head.weight.dtype
    major = _transformers_major()
    files = {
        "config.json": hf_config(model.config, tokenizer.eot_token, weights_dtype, major, tokenizer),
        "generation_config.json": generation_config(model.config, tokenizer),
        "tokenizer_config.json": tokenizer_config(model.config, tokenizer),
        "special_tokens_map.json": special_tokens_map(tokenizer),
    }

    def fill(folder: Path) -> None:
        state = model.state_dict()
        if model.config.tie_embeddings:  # safetensors cannot hold shared tensors; transformers re-ties
            del state["lm_head.weight"]
        tensors = {key: t.detach().to("cpu", weights_dtype).contiguous() for key, t in state.items()}
        safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (folder / "tokenizer.json").write_text(tokenizer_json(tokenizer), encoding="utf-8")
        (folder / "README.md").write_text(model_card(model, tokenizer, out.name), encoding="utf-8")

    return write_folder_atomic(out, fill)


def hf_config(
    config: ModelConfig, eot: int | None, dtype: torch.dtype, major: int | None, tokenizer: Tokenizer | None = None
) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with QK-norm: LLaMA's layers with a
    normalised query and key per head; ``Qwen2ForCausalLM`` with biases on the query, key and value;
    ``MistralForCausalLM`` with its window) for transformers version ``major`` (None: not installed), with
    ``eot`` (``<|endoftext|>``'s id) as the BOS, EOS and padding id, or the ids of the ``tokenizer``'s roles."""
    architecture, model_type = (
        ("Qwen3ForCausalLM", "qwen3") if config.qk_norm else ("Qwen2ForCausalLM", "qwen2") if config.qkv_bias
        else ("MistralForCausalLM", "mistral") if config.sliding_window is not None
        else ("LlamaForCausalLM", "llama")
    )  # fmt: skip
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": config.hidden_act,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "use_cache": True,
    }
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=_id(tokenizer, tokenizer.roles.eos),
                  pad_token_id=_pad_id(tokenizer))  # fmt: skip
    if config.sliding_window is not None:
        hf["sliding_window"] = config.sliding_window
    if config.qk_norm or config.qkv_bias:  # Qwen2/3 can also slide a window over the keys: not these models
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    dtype_name = str(dtype).replace("torch.", "")
    scaling = dict(config.rope_scaling) if config.rope_scaling is not None else None
    if major is None or major >= 5:
        hf["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta}
        hf["dtype"] = dtype_name
    if major is None or major < 5:
        hf["rope_theta"] = config.rope_theta
        hf["rope_scaling"] = scaling
        hf["torch_dtype"] = dtype_name
    if major is not None:
        hf["transformers_version"] = importlib.metadata.version("transformers")
    return hf


def generation_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: smallm's sampling defaults, the tokenizer's stop tokens, no padding ids."""
    stops = tokenizer.stop_ids
    generation: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0],
        "pad_token_id": _pad_id(tokenizer),
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
    }
    padding = list(range(tokenizer.vocab_size, config.vocab_size))
    if padding:
        generation["suppress_tokens"] = padding
    return {key: value for key, value in generation.items() if value is not None}


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """smallm's ``tokenizer.json`` with a post-processor that puts ``<|endoftext|>`` before every text
    (and before each of a pair) when ``add_special_tokens`` is true, the ``tokenizers`` default. A
    tokenizer trained elsewhere is its own file, whose post-processor already adds what it adds."""
    if tokenizer.foreign:
        return tokenizer.to_json()
    document = json.loads(tokenizer.to_json())
    eot = tokenizer.eot_token
    if eot is not None:
        bos = {"SpecialToken": {"id": EOT, "type_id": 0}}
        document["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOT, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]}},
        }  # fmt: skip
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def tokenizer_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer of ``tokenizer.json``, its special tokens, and its chat
    template: the model's own, else ChatML. smallm's tokenizers: ``<|endoftext|>`` as BOS (added), EOS and
    padding; one trained elsewhere: its roles (:mod:`smallm.roles`)."""
    roles = tokenizer.roles
    eot = EOT if tokenizer.eot_token is not None else None
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    bos, eos = (roles.document if roles.add_bos else None, roles.eos) if tokenizer.foreign else (eot, eot)
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": roles.extra.get("pad_token", eos),
        "unk_token": roles.extra.get("unk_token"),
        "add_bos_token": tokenizer.bos_id is not None and roles.add_bos,
        "add_eos_token": False,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": text, **flags} for text, i in specials},
    }
    if roles.chat_template is not None:
        result["chat_template"] = roles.chat_template
    elif IM_START in tokenizer.special_tokens and IM_END in tokenizer.special_tokens:
        result["chat_template"] = CHAT_TEMPLATE
    return result


def _id(tokenizer: Tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.special_tokens.get(token)


def _pad_id(tokenizer: Tokenizer) -> int | None:
    """The padding id: the model's ``pad_token``, else its end of text (smallm's: ``<|endoftext|>``)."""
    roles = tokenizer.roles
    return _id(tokenizer, roles.extra.get("pad_token", roles.eos if tokenizer.foreign else EOT))


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, Any]:
    config = tokenizer_config(ModelConfig(vocab_size=max(1, tokenizer.vocab_size)), tokenizer)
    named = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
    others = [text for text in tokenizer.special_tokens if text not in named.values()]
    return {**{key: value for key, value in named.items() if value}, "additional_special_tokens": others}


def model_card(model: SmallLM, tokenizer: Tokenizer, name: str) -> str:
    c = model.config
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [smallm, llama]
---

# {name}

A {model.num_parameters() / 1e6:.1f}M-parameter LLaMA-style model exported by smallm.
{c.n_layer} layers, width {c.n_embd}, {c.n_head} attention heads ({c.n_kv_head} key/value), context {c.max_seq_len}.
Byte-level BPE vocabulary of {tokenizer.vocab_size} tokens (embedding table {c.vocab_size}).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = AutoModelForCausalLM.from_pretrained("{name}")
```

{_bos_sentence(tokenizer)}
"""


def _bos_sentence(tokenizer: Tokenizer) -> str:
    document = tokenizer.roles.document
    if document is None:
        return "The tokenizer adds nothing in front of a text."
    if tokenizer.roles.add_bos:
        return f"Every training document began with `{document}`, and the tokenizer adds it in front of every text."
    return f"Training documents were separated by `{document}`; the tokenizer adds nothing in front of a text."


# ----- files ------------------------------------------------------------------------------------------


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in DTYPES.values():
            raise HFError(f"dtype {dtype} is not one of {', '.join(map(str, DTYPES.values()))}")
        return dtype
    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _transformers_major() -> int | None:
    """The installed transformers' major version, read without importing it (None: not installed)."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
