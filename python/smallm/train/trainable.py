"""The model a run trains: built from the run's configuration, and what its checkpoints hold.

* :class:`FullModel`: every weight trains and checkpoints hold the whole state dict. Pretraining builds
  it fresh from a preset (the vocabulary rounded up to a multiple of 64) or from the weights of
  ``--init-from``; full fine-tuning from the checkpoint it tunes.
* :class:`AdapterModel`: LoRA adapters (QLoRA: over a 4-bit NF4 base) on a frozen base, and with
  ``--lora-train-embeddings`` the embedding table (and an untied ``lm_head``) training in full beside them.
  Checkpoints hold those tensors only; at the end the adapter is also written in peft's layout to
  ``RUN/adapter/``, and the run's config names the base it belongs to (``lora`` section).

:func:`build_trainable` chooses and builds one, on the run's device.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from smallm.files.atomic import sha256_file
from smallm.model.config import ModelConfig, padded_vocab
from smallm.model.lm import SmallLM
from smallm.model.lora import (
    LoraSettings,
    adapter_state,
    apply_lora,
    load_adapter,
    place_frozen_base,
    quantize_nf4,
    save_adapter,
)
from smallm.model.reward import RewardModel
from smallm.run.layout import ADAPTER_DIR, WEIGHTS_FILE
from smallm.run.load import find_tokenizer, load_model, read_config, resolve_checkpoint
from smallm.text.extension import new_token_sources
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import FinetuneConfig, RunConfig, TrainConfig
from smallm.train.distributed import Runtime
from smallm.train.resolve import model_config_for

__all__ = ["AdapterModel", "FullModel", "Trainable", "build_trainable"]

Reference = Callable[[], AbstractContextManager[nn.Module]]


class FullModel:
    """A model whose every weight trains."""

    quantized = False

    def __init__(self, module: SmallLM) -> None:
        self.module, self.config = module, module.config

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        """The tensors a checkpoint stores instead of the whole state dict: None, all of it."""
        return None

    def restore(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        self.module.load_state_dict(tensors)

    def frozen_start(self, dtype: torch.dtype) -> Reference:
        """A frozen copy of the weights as they are now, in ``dtype`` (DPO's reference)."""
        frozen = copy.deepcopy(self.module).to(dtype=dtype).eval().requires_grad_(False)
        return lambda: nullcontext(frozen)

    def run_config(self) -> dict[str, Any]:
        return {}

    def finish(self, out: Path, runtime: Runtime) -> None:
        """What to write beside the checkpoints at the end of the run: nothing."""


class AdapterModel:
    """LoRA or QLoRA adapters over a frozen base; see the module docstring."""

    def __init__(self, module: SmallLM, settings: LoraSettings, cfg: FinetuneConfig, base: Path, runtime: Runtime,
                 frozen_dtype: torch.dtype) -> None:  # fmt: skip
        self.config, self.settings, self.base = module.config, settings, base
        self.base_sha256 = sha256_file(base / WEIGHTS_FILE)  # what merging onto it later checks
        self.quantized, self.train_embeddings = cfg.quantize == "nf4", cfg.lora_train_embeddings
        if self.quantized:
            size = quantize_nf4(module, runtime.device, frozen_dtype)
            runtime.log(f"block weights quantized to NF4: {size / 2**20:.1f} MiB")
        place_frozen_base(module, runtime.device, frozen_dtype)
        self.peft = apply_lora(module, settings)
        self.module = module  # peft injects its layers into the module itself
        for p in self.embedding_weights().values():
            p.data = p.data.float()  # trained in fp32 like the adapters
            p.requires_grad_(True)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        runtime.log(f"LoRA r={settings.r} on {','.join(settings.targets)}: {trainable / 1e6:.2f}M trainable")

    def embedding_weights(self) -> dict[str, nn.Parameter]:
        """The weights trained in full beside the adapters, by their checkpoint names: a reward model's
        head, and with ``--lora-train-embeddings`` the embedding table and (untied) lm_head."""
        base = self.peft.get_base_model()
        head = {"score.weight": base.score.weight} if isinstance(base, RewardModel) else {}
        if not self.train_embeddings:
            return head
        weights = {**head, "model.embed_tokens.weight": base.model.embed_tokens.weight}
        if not self.config.tie_embeddings:
            weights["lm_head.weight"] = base.lm_head.weight
        return weights

    def checkpoint_tensors(self) -> dict[str, torch.Tensor] | None:
        return {**adapter_state(self.peft), **self.embedding_weights()}

    def restore(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        tensors = dict(tensors)
        with torch.no_grad():
            for name, p in self.embedding_weights().items():
                p.copy_(tensors.pop(name))
        load_adapter(self.peft, tensors, source)

    def frozen_start(self, dtype: torch.dtype) -> Reference:
        """The base as it was at the start: the same network with its adapters disabled (no copy)."""

        @contextmanager
        def disabled() -> Iterator[nn.Module]:
            with self.peft.disable_adapter():
                yield self.module

        return disabled

    def run_config(self) -> dict[str, Any]:
        base = str(Path(os.path.abspath(self.base)))
        quantize = "nf4" if self.quantized else "none"
        return {
            "lora": {
                **asdict(self.settings), "quantize": quantize, "base": base, "base_sha256": self.base_sha256,
                "embeddings": self.train_embeddings,
            }
        }  # fmt: skip

    def finish(self, out: Path, runtime: Runtime) -> None:
        """Writes ``out/adapter/`` in peft's layout (not with weights trained in full beside it: it would be
        incomplete)."""
        if self.embedding_weights():
            trained = ", ".join(self.embedding_weights())
            runtime.log(f"{trained} trained in full too: make the full model with smallm-merge {out} --out DIR")
            return
        folder = save_adapter(self.peft, out / ADAPTER_DIR, base=str(self.base))
        runtime.log(f"adapter (peft format) in {folder}")


Trainable = Union[FullModel, AdapterModel]


def initialise(model: SmallLM, scheme: str) -> None:
    """Weights of a fresh model for ``scheme``: ``gpt2`` is :meth:`SmallLM.init_weights` (normal; the
    projections into the residual stream scaled by 1/sqrt(2 x layers)); ``zero-residual`` also starts
    ``o_proj`` and ``down_proj`` at zero, so that every block begins as the identity and the first
    steps shape the embeddings and the blocks' inputs (modded-nanogpt, nanochat)."""
    if scheme == "zero-residual":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()


def build_trainable(cfg: RunConfig, tokenizer: Tokenizer, runtime: Runtime, amp_dtype: torch.dtype | None) -> Trainable:
    """The model ``cfg`` trains, on the runtime's device, with activation checkpointing as configured."""
    if isinstance(cfg, FinetuneConfig):
        base = resolve_checkpoint(cfg.init_from or "")
        module = load_model(base)[0].train()  # a LoRA run's adapter is merged into its base
        runtime.log(f"fine-tuning {base} ({module.num_parameters() / 1e6:.1f}M parameters)")
        _fit_vocabulary(module, tokenizer, cfg, runtime)
        if cfg.method == "rm" and not isinstance(module, RewardModel):
            module = RewardModel.from_lm(module)  # a scalar head on the base's last hidden state
            runtime.log("reward model: a score head on the last token's hidden state")
        settings = cfg.lora()
        if settings is None:
            model: Trainable = FullModel(module.to(runtime.device))
        else:
            # Frozen weights are only read through autocast: store them in its dtype.
            model = AdapterModel(module, settings, cfg, base, runtime, amp_dtype or torch.float32)
    elif isinstance(cfg, TrainConfig):
        model = FullModel(_pretraining_model(cfg, tokenizer, runtime).to(runtime.device))
    else:
        raise TypeError(f"no model builder for a {type(cfg).__name__}")
    model.module.gradient_checkpointing = cfg.activation_checkpointing
    return model


def _fit_vocabulary(module: SmallLM, tokenizer: Tokenizer, cfg: FinetuneConfig, runtime: Runtime) -> None:
    """Grows the base's embedding to the tokenizer when special tokens were added to it (ChatML's markers
    for a base without a chat template, :func:`smallm.text.chat.with_chat_format`), saying so (a LoRA run then
    trains the embeddings too: the settings resolved it so, since the new rows must be learned)."""
    added = tokenizer.roles.added
    if added:
        ids = ", ".join(f"{t} = {tokenizer.special_tokens[t]}" for t in added)
        runtime.log(f"the base has no chat template: ChatML's {ids} added to its vocabulary")
    if tokenizer.vocab_size > module.config.vocab_size:
        size = padded_vocab(tokenizer.vocab_size)
        runtime.log(f"embedding grown from {module.config.vocab_size} to {size} rows (new rows: the mean row)")
        module.grow_vocab(size)
    if added and cfg.lora_r:
        runtime.log("LoRA trains the embeddings too (--lora-train-embeddings): the added tokens' rows are new")


def _pretraining_model(cfg: TrainConfig, tokenizer: Tokenizer, runtime: Runtime) -> SmallLM:
    """A fresh model of the preset, or one with the weights of ``init_from`` (a LoRA run: merged into its
    base; a reward model: its language model, without the score head)."""
    init = resolve_checkpoint(cfg.init_from) if cfg.init_from else None
    shape = model_config_for(cfg, tokenizer, init)
    if init is None:
        model = SmallLM(shape)
        initialise(model, cfg.init)
        return model
    loaded = load_model(init)[0]
    model = SmallLM(ModelConfig(**read_config(init)["model"]))
    if isinstance(loaded, RewardModel):
        model.load_state_dict(loaded.language_model_state())
        runtime.log(f"initialised from the language model of the reward model {init} (its score head left out)")
    else:
        model.load_state_dict(loaded.state_dict())
        merged = " merged into its base" if "lora" in read_config(init) else ""
        runtime.log(f"initialised from the weights of {init}{merged}")
    base = find_tokenizer(init, read_config(init))
    if tokenizer.vocab_size > base.vocab_size:  # the data's tokenizer extends the model's (resolve checked)
        _grow(model, shape.vocab_size, tokenizer, base, runtime)
    return model.train()


def _grow(model: SmallLM, vocab_size: int, tokenizer: Tokenizer, base: Tokenizer, runtime: Runtime) -> None:
    """Grows ``model`` (of ``base``'s vocabulary) to ``tokenizer``, an extension of it, saying how."""
    sources = new_token_sources(tokenizer, base)
    rows, head = model.config.vocab_size, "" if model.config.tie_embeddings else " and head"
    model.grow_vocab(vocab_size, sources)
    grown = f"grown from {rows} to {vocab_size} rows" if vocab_size > rows else f"padding rows ({rows}) reused"
    runtime.log(
        f"the data's tokenizer adds {tokenizer.vocab_size - base.vocab_size} tokens (ids {base.vocab_size}-"
        f"{tokenizer.vocab_size - 1}) to the model's: embedding{head} {grown}; a new token's embedding row is "
        "the mean of the rows of the old tokens that spell it"
        + ("" if model.config.tie_embeddings else ", its head row the first of those tokens' (EEVE)")
    )
