"""Hugging Face interop: a checkpoint as a ``transformers`` LLaMA folder, such a folder as a smallm run, and
the folder on the Hub.

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
  ``special_tokens_map.json`` and a short ``README.md`` model card. The tokenizer adds no BOS: like
  :meth:`smallm.Tokenizer.encode`, it gives the ids of the text only.

:func:`import_hf` reads a local ``LlamaForCausalLM`` folder (``config.json`` and safetensors, sharded or
not) into a smallm run directory; :func:`push_to_hub` uploads an exported folder. The ChatML renderers of
:mod:`smallm.chat` are re-exported here beside the template that matches them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

import safetensors
import safetensors.torch
import torch

from smallm.chat import IM_END, IM_START, chatml_ids, render_chatml
from smallm.checkpoint import TrainingState, save_checkpoint
from smallm.model import ModelConfig, SmallLM
from smallm.runs import load_model
from smallm.tokenizer import Tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DTYPES",
    "HFError",
    "chatml_ids",
    "export_hf",
    "import_hf",
    "model_config_from_hf",
    "push_to_hub",
    "render_chatml",
]

PathLike = Union[str, "os.PathLike[str]"]
EOT = "<|endoftext|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The ``--dtype`` names of the weight types an export can have."""
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
"""What a folder needs to be pushed: a model transformers can load, and its tokenizer."""
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")


class HFError(RuntimeError):
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
    _check_destination(out, force, source=Path(checkpoint_path))
    model, tokenizer, _ = load_model(checkpoint_path, prefer=prefer)
    weights_dtype = weights_dtype or model.lm_head.weight.dtype
    major = _transformers_major()
    files = {
        "config.json": hf_config(model.config, tokenizer, weights_dtype, major),
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
        (folder / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        (folder / "README.md").write_text(model_card(model, tokenizer, out.name), encoding="utf-8")

    return _write_folder(out, fill)


def hf_config(config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype, major: int | None) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for transformers version ``major`` (None: not installed)."""
    eot = tokenizer.eot_token
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
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
    dtype_name = str(dtype).replace("torch.", "")
    if major is None or major >= 5:
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        hf["dtype"] = dtype_name
    if major is None or major < 5:
        hf["rope_theta"] = config.rope_theta
        hf["rope_scaling"] = None
        hf["torch_dtype"] = dtype_name
    if major is not None:
        hf["transformers_version"] = importlib.metadata.version("transformers")
    return hf


def generation_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``generation_config.json``: smallm's sampling defaults, its stop tokens, no padding ids."""
    eot, im_end = tokenizer.eot_token, tokenizer.special_tokens.get(IM_END)
    stops = [i for i in (eot, im_end) if i is not None]
    generation: dict[str, Any] = {
        "bos_token_id": eot,
        "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0],
        "pad_token_id": eot,
        "do_sample": True,
        "temperature": 0.8,
        "top_k": 50,
    }
    padding = list(range(tokenizer.vocab_size, config.vocab_size))
    if padding:
        generation["suppress_tokens"] = padding
    return {key: value for key, value in generation.items() if value is not None}


def tokenizer_config(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer of ``tokenizer.json``, its special tokens, ChatML."""
    eot = EOT if tokenizer.eot_token is not None else None
    specials = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    result: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": text, **flags} for text, i in specials},
    }
    if IM_START in tokenizer.special_tokens and IM_END in tokenizer.special_tokens:
        result["chat_template"] = CHAT_TEMPLATE
    return result


def special_tokens_map(tokenizer: Tokenizer) -> dict[str, Any]:
    eot = EOT if tokenizer.eot_token is not None else None
    others = [text for text in tokenizer.special_tokens if text != EOT]
    named = {"bos_token": eot, "eos_token": eot, "pad_token": eot}
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

Every training document began with `<|endoftext|>` and the tokenizer does not add it: start prompts with it.
"""


# ----- import -----------------------------------------------------------------------------------------


def import_hf(hf_dir: PathLike, out_run_dir: PathLike, *, force: bool = False) -> Path:
    """Reads a local ``LlamaForCausalLM`` folder into a new smallm run directory ``out_run_dir``: one
    checkpoint, ``checkpoints/step_00000000`` (the weights in fp32, a fresh optimizer state, step 0),
    that :func:`smallm.runs.load_model` opens, and the folder's ``tokenizer.json`` when it is a smallm
    byte-level BPE tokenizer (otherwise a warning: only the weights are imported). Configurations smallm
    does not implement are refused, naming the field. Returns the run directory.

    The checkpoint is for generation, evaluation, export and :func:`smallm.checkpoint.load_checkpoint`
    into a model; ``smallm-train --resume`` refuses it, since it holds none of a run's optimizer,
    scheduler or loader state (continued training from imported weights needs an init-from option)."""
    source, out = Path(hf_dir), Path(os.path.abspath(out_run_dir))
    if not source.is_dir():
        raise HFError(f"{source}: no such directory")
    hf = _read_json(source / "config.json")
    model_config = model_config_from_hf(hf)
    _check_destination(out, force, source=source)
    model = SmallLM(model_config)
    _load_hf_weights(model, read_hf_weights(source))
    tokenizer = _import_tokenizer(source, model_config)
    origin = {"path": str(source.absolute()), "architectures": hf.get("architectures")}
    run_config = {"train": {}, "model": dataclasses.asdict(model_config), "imported_from": origin}

    def fill(run: Path) -> None:
        state = TrainingState(step=0, tokens_seen=0)
        save_checkpoint(run, model, torch.optim.AdamW(model.parameters()), None, None, state, run_config)
        (run / "config.json").write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(run)

    return _write_folder(out, fill)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face LLaMA ``config.json``; raises :class:`HFError` naming
    the field for what smallm does not implement (other model types, rotary scaling, biases, other
    activations, a head size other than hidden_size / num_attention_heads)."""

    def refuse(field: str, value: Any, why: str) -> HFError:
        return HFError(f"config.json: {field} = {json.dumps(value)} is not supported: {why}")

    if hf.get("model_type") != "llama":
        raise refuse("model_type", hf.get("model_type"), "smallm imports LLaMA models (model_type 'llama') only")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "smallm's MLP is SwiGLU (silu)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise refuse(field, hf[field], "smallm's linear layers have no biases")
    theta = hf.get("rope_theta", 10000.0)
    for field in ("rope_scaling", "rope_parameters"):
        rope = hf.get(field)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise refuse(field, rope, "expected null or an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise refuse(f"{field}.rope_type", kind, "smallm implements unscaled (default) rotary embeddings only")
        unknown = sorted(set(rope) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
        if unknown:
            raise refuse(f"{field}.{unknown[0]}", rope[unknown[0]], "smallm implements default rotary embeddings only")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise refuse(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"], "smallm rotates whole heads")
        theta = rope.get("rope_theta", theta)
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise HFError(f"config.json has no {', '.join(missing)}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and heads > 0 and head_dim * heads != hidden:
        raise refuse("head_dim", head_dim, f"smallm's heads are hidden_size / num_attention_heads = {hidden / heads:g}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_embd=hidden,
            n_head=heads,
            n_kv_head=hf.get("num_key_value_heads") or heads,
            intermediate_size=hf.get("intermediate_size"),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as e:
        raise HFError(f"config.json does not describe a model smallm can build: {e}") from e


def read_hf_weights(directory: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors``, or of the shards ``model.safetensors.index.json``
    lists, on the CPU."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
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
            problems.append(f"{label} {_listing(sorted(keys))}")
    wrong = [
        f"{key} (file {list(tensors[key].shape)}, config {list(t.shape)})"
        for key, t in expected.items()
        if key in tensors and tensors[key].shape != t.shape
    ]
    if wrong:
        problems.append(f"shapes {_listing(wrong)}")
    if problems:
        raise HFError(f"the weights do not fit config.json: {'; '.join(problems)}")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)


def _import_tokenizer(source: Path, config: ModelConfig) -> Tokenizer | None:
    file = source / "tokenizer.json"
    if not file.is_file():
        why = f"{source} has no tokenizer.json"
    else:
        try:
            tokenizer = Tokenizer.load(file)
        except Exception as e:  # the core's reasons vary; any of them means "not ours"
            why = f"{file} is not a smallm byte-level BPE tokenizer ({e})"
        else:
            if tokenizer.vocab_size <= config.vocab_size:
                return tokenizer
            why = f"{file} has {tokenizer.vocab_size} ids, more than the model's {config.vocab_size}"
    warnings.warn(
        f"{why}: only the weights were imported; put a smallm tokenizer.json in the run directory "
        "to generate or train with it",
        stacklevel=3,
    )
    return None


# ----- push -------------------------------------------------------------------------------------------


def push_to_hub(
    folder: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload a smallm export",
) -> str:
    """Uploads an exported folder to the Hub model repository ``repo_id`` (NAMESPACE/NAME), creating it
    (``private`` when asked) if needed; returns the repository URL. Everything that can be checked
    locally is checked before the network: the folder, the repository id, ``HF_HUB_OFFLINE`` and a token
    (``token``, else the one from ``huggingface-cli login`` or ``HF_TOKEN``)."""
    folder = Path(folder)
    missing = [name for name in EXPORT_FILES if not (folder / name).is_file()]
    if missing:
        raise HFError(f"{folder} is not an exported model folder (no {', '.join(missing)}): make it with smallm-export")
    check_repo_id(repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        raise HFError("offline (HF_HUB_OFFLINE=1): cannot reach the Hugging Face Hub")
    try:
        import huggingface_hub
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as e:
        raise HFError("pushing needs huggingface_hub: pip install 'smallm[hf]'") from e
    token = token or huggingface_hub.get_token()
    if not token:
        raise HFError(
            "not logged in to the Hugging Face Hub: run `hf auth login` (`huggingface-cli login` with older "
            "huggingface_hub) or set HF_TOKEN"
        )
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = "; check that the token is valid and may write to that namespace" if status in (401, 403) else ""
        raise HFError(f"the Hugging Face Hub refused the upload to {repo_id}: {e}{hint}") from e
    except Exception as e:  # connection, DNS, TLS, timeouts: whatever the HTTP client raises
        raise HFError(f"could not upload to the Hugging Face Hub ({type(e).__name__}: {e})") from e
    return str(url)


def check_repo_id(repo_id: str) -> None:
    """Raises :class:`HFError` unless ``repo_id`` is NAMESPACE/NAME as the Hub accepts it: letters, digits,
    ``-``, ``_`` and ``.``, not starting or ending with ``-`` or ``.``, no ``--`` or ``..``, at most 96
    characters."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    valid = (
        len(parts) == 2
        and all(_REPO_PART.fullmatch(part) for part in parts)
        and "--" not in repo_id
        and ".." not in repo_id
        and len(repo_id) <= 96
    )
    if not valid:
        raise HFError(
            f"bad repository id {repo_id!r}: expected NAMESPACE/NAME (letters, digits, '-', '_', '.'; "
            "no '--' or '..'; at most 96 characters), e.g. my-org/my-model"
        )


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


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_destination(out: Path, force: bool, source: Path) -> None:
    """Refuses an output that exists (not an empty directory) without ``force``, and one that holds the
    source, which replacing would delete."""
    source = Path(os.path.abspath(source))
    if out == source or out in source.parents:
        raise HFError(f"the output {out} would replace its own source {source}; choose another directory")
    if out.exists() and not out.is_dir():
        raise HFError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise HFError(f"{out} already exists and is not empty; pass --force (force=True) to replace it")


def _write_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Runs ``fill`` on a temporary directory beside ``final``, syncs it and renames it to ``final`` (the
    one it replaces is moved aside first and deleted after): ``final`` is never half written."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        _sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    displaced = final.with_name(f".{final.name}.old-{os.getpid()}") if final.exists() else None
    try:
        if displaced is not None:
            shutil.rmtree(displaced, ignore_errors=True)
            os.rename(final, displaced)
        os.rename(tmp, final)
    except OSError as e:
        if displaced is not None and displaced.exists() and not final.exists():
            os.rename(displaced, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise HFError(f"could not move {tmp} into place as {final}: {e}") from e
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    return final


def _sync_tree(directory: Path) -> None:
    """Makes the files under ``directory`` and the directories' entries durable, before the rename."""
    for path in [*directory.rglob("*"), directory]:
        if path.is_dir() and os.name == "nt":
            continue  # Windows cannot fsync a directory
        fd = os.open(path, os.O_RDWR if path.is_file() else os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
