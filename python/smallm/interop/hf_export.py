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
  (:mod:`smallm.text.roles`: BOS, EOS, padding, stop ids, chat template) fill these files instead.

:mod:`smallm.interop.hf_import` reads such a folder back as a smallm run; :mod:`smallm.interop.hub` uploads it. The
ChatML renderers of :mod:`smallm.text.chat` are re-exported here beside the template that matches them.
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

from smallm.errors import SmallmError
from smallm.files.atomic import write_failure
from smallm.files.destination import Artifact, claim
from smallm.model.config import ModelConfig
from smallm.model.lm import SmallLM
from smallm.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from smallm.model.reward import RewardModel
from smallm.run.load import inputs_of, load_model, resolve_checkpoint
from smallm.text.chat import CHAT_TEMPLATE, IM_END, IM_START
from smallm.text.roles import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE
from smallm.text.tokenizer import TOKENIZER_FILE, Tokenizer

__all__ = [
    "DTYPES", "HF_CONFIG", "HF_FOLDER", "HF_WEIGHTS", "HFError", "export_hf", "hf_config", "hf_folder", "is_hf_folder",
    "special_tokens_map", "tokenizer_config", "tokenizer_json", "transformers_major",
]  # fmt: skip

PathLike = Union[str, "os.PathLike[str]"]
EOT = "<|endoftext|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The ``--dtype`` names of the weight types an export can have."""
HF_CONFIG, HF_WEIGHTS = "config.json", "model.safetensors"
"""A transformers folder's model config and (unsharded) weights."""
SPECIAL_TOKENS_MAP, MODEL_CARD = "special_tokens_map.json", "README.md"
HF_ENTRIES = (
    HF_CONFIG, HF_WEIGHTS, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP,
    MODEL_CARD, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
)  # fmt: skip
"""What an export writes in its folder (a model, or a LoRA run's adapter)."""


class HFError(SmallmError, RuntimeError):
    """An export, import or push could not be done; the message says which file or setting, and why."""


# ----- export -----------------------------------------------------------------------------------------


def is_hf_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``transformers`` model (its ``config.json`` has a ``model_type``) or a peft
    adapter."""
    try:
        config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    return (isinstance(config, dict) and "model_type" in config) or (folder / ADAPTER_CONFIG).is_file()


HF_FOLDER = Artifact("a transformers folder", is_hf_folder, HF_ENTRIES)
"""An export's folder as an output, for :func:`smallm.files.destination.claim`."""


def export_hf(
    checkpoint_path: PathLike,
    out_dir: PathLike,
    *,
    force: bool = False,
    dtype: torch.dtype | str | None = None,
    prefer: str = "latest",
) -> Path:
    """Writes the checkpoint (a checkpoint directory, or a run directory's ``prefer`` = latest or best
    one) as a Hugging Face folder ``out_dir`` and returns its path: a language model as its
    ``*ForCausalLM`` class, a reward model as ``*ForSequenceClassification``. ``dtype``: the weights' type
    (``"bf16"``, ``"fp16"``, ``"fp32"`` or a ``torch.dtype``; default: as loaded, fp32). The destination
    follows the rule of :mod:`smallm.files.destination` (``force`` replaces an earlier export); the
    folder is written beside it and renamed into place, so it is never half written."""
    weights_dtype = _resolve_dtype(dtype)
    checkpoint = resolve_checkpoint(checkpoint_path, prefer=prefer)
    with claim(out_dir, HF_FOLDER, force=force, command="smallm-export", inputs=inputs_of(checkpoint)) as destination:
        model, tokenizer, _ = load_model(checkpoint)
        files, tensors = hf_folder(model, tokenizer, weights_dtype or model.lm_head.weight.dtype, destination.path.name)

        def fill(folder: Path) -> None:
            safetensors.torch.save_file(tensors, str(folder / HF_WEIGHTS), metadata={"format": "pt"})
            for name, text in files.items():
                (folder / name).write_text(text, encoding="utf-8")

        try:
            return destination.write_folder(fill)
        except Exception as error:  # safetensors and the OS report a full disk in their own types
            raise HFError(write_failure(destination.path, error)) from error


def hf_folder(
    model: SmallLM, tokenizer: Tokenizer, dtype: torch.dtype, name: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The text files of ``model``'s transformers folder (by file name) and its weights in ``dtype``. A
    reward model is its architecture's ``*ForSequenceClassification`` (one label; the padding id set, which
    is how that class finds each row's last token: the BOS, never inside a conversation), without
    ``lm_head`` and a generation config."""
    config = hf_config(model.config, tokenizer.eot_token, dtype, transformers_major(), tokenizer)
    state = model.state_dict()
    reward = isinstance(model, RewardModel)
    if reward:
        architecture = config["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")
        config.update(architectures=[architecture], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        config["pad_token_id"] = tokenizer.bos_id
    if reward or model.config.tie_embeddings:  # transformers re-ties a tied head; a reward model has none
        del state["lm_head.weight"]
    documents: dict[str, Any] = {
        HF_CONFIG: config,
        TOKENIZER_CONFIG_FILE: tokenizer_config(model.config, tokenizer),
        SPECIAL_TOKENS_MAP: special_tokens_map(tokenizer),
    }
    if not reward:
        documents[GENERATION_CONFIG_FILE] = generation_config(model.config, tokenizer)
    files = {name: json.dumps(content, indent=2, ensure_ascii=False) + "\n" for name, content in documents.items()}
    files[TOKENIZER_FILE] = tokenizer_json(tokenizer)
    files[MODEL_CARD] = model_card(model, tokenizer, name, config["architectures"][0])
    tensors = {key: t.detach().to("cpu", dtype).contiguous() for key, t in state.items()}
    return files, tensors


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
    padding; one trained elsewhere: its roles (:mod:`smallm.text.roles`)."""
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


def model_card(model: SmallLM, tokenizer: Tokenizer, name: str, architecture: str) -> str:
    """The folder's ``README.md``: what the model is and how ``transformers`` loads it."""
    c = model.config
    reward = architecture.endswith("ForSequenceClassification")
    auto, pipeline = ("AutoModelForSequenceClassification", "text-classification") if reward else (
        "AutoModelForCausalLM", "text-generation")  # fmt: skip
    what = "reward model (one score per text, read at its last token)" if reward else "language model"
    return f"""---
library_name: transformers
pipeline_tag: {pipeline}
tags: [smallm, llama]
---

# {name}

A {model.num_parameters() / 1e6:.1f}M-parameter LLaMA-style {what} exported by smallm as `{architecture}`.
{c.n_layer} layers, width {c.n_embd}, {c.n_head} attention heads ({c.n_kv_head} key/value), context {c.max_seq_len}.
Byte-level BPE vocabulary of {tokenizer.vocab_size} tokens (embedding table {c.vocab_size}).

```python
from transformers import {auto}, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
model = {auto}.from_pretrained("{name}")
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


def transformers_major() -> int | None:
    """The installed transformers' major version, read without importing it (None: not installed)."""
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
