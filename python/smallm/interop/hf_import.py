"""Hugging Face import: a local ``LlamaForCausalLM`` (``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``MistralForCausalLM`` within its window) folder as a run.

:func:`import_hf` reads ``config.json`` and the safetensors weights (one file, or the shards an
``model.safetensors.index.json`` lists), refuses what smallm's model does not implement (other model
types, rotary scaling but llama3's, biases on other layers than Qwen2's, other activations) naming the
field, and writes a run of one checkpoint (:func:`smallm.run.write.write_run`) with the folder's byte-level
BPE ``tokenizer.json`` (smallm's, or one trained elsewhere: :meth:`smallm.Tokenizer.load`) and the
roles its ``tokenizer_config.json`` gives its special tokens (BOS, EOS, chat template: :mod:`smallm.text.roles`).
A Mistral model is LLaMA's within its attention window: its context becomes the window, and it is
exported back as ``MistralForCausalLM``. Heads wider than ``hidden_size / num_attention_heads`` (Qwen3
0.6B's ``head_dim``) are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import safetensors
import torch

from smallm.errors import listing
from smallm.interop.hf_export import HF_CONFIG, HF_WEIGHTS, HFError
from smallm.model.config import ACTIVATIONS, LLAMA3_SCALING, ModelConfig
from smallm.model.lm import SmallLM
from smallm.run.write import claim_run, write_run
from smallm.text.tokenizer import TOKENIZER_FILE, Tokenizer

__all__ = ["import_hf", "model_config_from_hf", "read_hf_weights"]

PathLike = Union[str, "os.PathLike[str]"]


def import_hf(hf_dir: PathLike, out_run_dir: PathLike, *, force: bool = False) -> Path:
    """Reads a local ``LlamaForCausalLM`` folder into a new smallm run directory ``out_run_dir``
    (:func:`smallm.run.write.write_run`: one checkpoint of the weights in fp32 at step 0, no optimizer state)
    that :func:`smallm.run.load.load_model` opens and ``smallm-train --init-from`` starts from, with the
    folder's BPE ``tokenizer.json`` (byte-level or SentencePiece-style) and its roles (one smallm cannot
    read, or none: a warning that only the weights are imported). Configurations smallm does not implement are refused,
    naming the field. Returns the run directory."""
    source = Path(hf_dir)
    if not source.is_dir():
        raise HFError(f"{source}: no such directory")
    hf = _read_json(source / HF_CONFIG)
    model_config = model_config_from_hf(hf)
    with claim_run(out_run_dir, force=force, command="smallm-import", inputs=[source]) as destination:
        model = SmallLM(model_config)
        _load_hf_weights(model, read_hf_weights(source))
        tokenizer = _import_tokenizer(source, model_config)
        origin = {"path": str(source.absolute()), "architectures": hf.get("architectures")}
        run_config = {"train": {}, "model": dataclasses.asdict(model_config), "imported_from": origin}
        return write_run(destination, model, tokenizer, run_config)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face LLaMA, Qwen2, Qwen3 or Mistral ``config.json``; raises
    :class:`HFError` naming the field for what smallm does not implement (other model types, rotary scaling but
    llama3's, biases, other activations, Qwen's sliding windows). A Mistral model's context is cut to its
    ``sliding_window`` (with a warning)."""

    def refuse(field: str, value: Any, why: str) -> HFError:
        return HFError(f"config.json: {field} = {json.dumps(value)} is not supported: {why}")

    if hf.get("model_type") not in ("llama", "qwen2", "qwen3", "mistral"):
        raise refuse("model_type", hf.get("model_type"), "smallm imports LLaMA, Qwen2, Qwen3 and Mistral models only")
    if hf.get("hidden_act", "silu") not in ACTIVATIONS:
        raise refuse("hidden_act", hf["hidden_act"], f"smallm's gated MLP takes {', '.join(ACTIVATIONS)}")
    if hf.get("use_sliding_window"):
        raise refuse("use_sliding_window", hf["use_sliding_window"], "smallm's attention sees the whole context")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise refuse(field, hf[field], "smallm's linear layers have no biases")
    theta, scaling = hf.get("rope_theta", 10000.0), None
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise refuse(field, rope, "expected null or an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise refuse(f"{field}.rope_type", kind, "smallm implements default and llama3 rotary embeddings only")
        numbers = set(LLAMA3_SCALING) if kind == "llama3" else set()
        unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"} - numbers)
        if unknown:
            raise refuse(f"{field}.{unknown[0]}", rope[unknown[0]], f"smallm implements {kind} rotary embeddings as is")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise refuse(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"], "smallm rotates whole heads")
        theta = rope.get("rope_theta", theta)
        if kind == "llama3":
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_SCALING if k in rope}}
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise HFError(f"config.json has no {', '.join(missing)}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    context, window = hf.get("max_position_embeddings", 2048), None
    if hf["model_type"] == "mistral":
        window = hf.get("sliding_window")
        if window is not None and not (isinstance(window, int) and window > 0):
            raise refuse("sliding_window", window, "expected null or a positive number of positions")
        if window is not None and isinstance(context, int) and context > window:
            # Within its window a Mistral model is LLaMA's; beyond it its attention differs, so smallm stops there.
            warnings.warn(
                f"config.json: sliding_window = {window} is smaller than max_position_embeddings = {context}: "
                f"smallm attends within the window, so the imported model's context is {window}",
                stacklevel=3,
            )
            context = window
        window = window or context  # no window: one as wide as the context (the same attention)
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hidden,
            n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads,
            intermediate_size=hf.get("intermediate_size"),
            max_seq_len=context,
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
            qk_norm=hf["model_type"] == "qwen3",
            qkv_bias=hf["model_type"] == "qwen2",  # Qwen2's attention always has them
            rope_scaling=scaling,
            hidden_act=hf.get("hidden_act", "silu"),
            sliding_window=window if hf["model_type"] == "mistral" else None,
            head_dim=hf.get("head_dim"),  # Qwen3 0.6B's is wider than hidden_size / num_attention_heads
        )
    except (TypeError, ValueError) as e:
        raise HFError(f"config.json does not describe a model smallm can build: {e}") from e


def read_hf_weights(directory: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors``, or of the shards ``model.safetensors.index.json``
    lists, on the CPU."""
    directory = Path(directory)
    single, index = directory / HF_WEIGHTS, directory / f"{HF_WEIGHTS}.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFError(f"{index} has no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif any(directory.glob("pytorch_model*.bin")):
        raise HFError(
            f"{directory} holds pytorch_model*.bin weights only; smallm reads safetensors: re-save the model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise HFError(f"{directory} has no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safetensors.safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if key in tensors:
                        raise HFError(f"{key} is stored twice (again in {file.name})")
                    tensors[key] = weights.get_tensor(key)
        except HFError:
            raise
        except Exception as e:
            raise HFError(f"could not read {file}: {e}") from e
    return tensors


def _load_hf_weights(model: SmallLM, tensors: dict[str, torch.Tensor]) -> None:
    # Rotary tables are a function of the config (some old exports store them); a tied lm_head is the
    # embedding, whatever the file says, as in transformers.
    tensors = {key: t for key, t in tensors.items() if not key.endswith("rotary_emb.inv_freq")}
    expected = model.state_dict()
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
        del expected["lm_head.weight"]
    problems = []
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{label} {listing(sorted(keys))}")
    wrong = [
        f"{key} (file {list(tensors[key].shape)}, config {list(t.shape)})"
        for key, t in expected.items()
        if key in tensors and tensors[key].shape != t.shape
    ]
    if wrong:
        problems.append(f"shapes {listing(wrong)}")
    if problems:
        raise HFError(f"the weights do not fit config.json: {'; '.join(problems)}")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def _import_tokenizer(source: Path, config: ModelConfig) -> Tokenizer | None:
    file = source / TOKENIZER_FILE
    if not file.is_file():
        why = f"{source} has no tokenizer.json"
    else:
        try:
            tokenizer = Tokenizer.load(file)
        except Exception as e:  # the core's reasons vary; any of them means "not ours"
            why = f"{file} cannot be used ({e})"
        else:
            if tokenizer.vocab_size <= config.vocab_size:
                return tokenizer
            why = f"{file} has {tokenizer.vocab_size} ids, more than the model's {config.vocab_size}"
    warnings.warn(
        f"{why}: only the weights were imported; put a byte-level BPE tokenizer.json in the run directory "
        "to generate or train with it",
        stacklevel=3,
    )
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HFError(f"{file} not found") from None
    except (OSError, ValueError) as e:
        raise HFError(f"could not read {file}: {e}") from e
    if not isinstance(content, dict):
        raise HFError(f"{file} is not a JSON object")
    return content
