"""The kinds of run the dashboard trains: pretraining, SFT, DPO and a reward model, each with the configuration
class of its console script and the settings its form shows.

:data:`KINDS` holds them by name (``pretrain``, ``sft``, ``dpo``, ``rm``). :func:`ready_to_run` does what the
console scripts do with checked settings before they train (``--resume`` takes the run's own settings, a
fine-tuning base that is a Hub id becomes the local run it names), and :func:`saved_settings` reads a run
directory's kind and settings back from its ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from smallm.run.layout import CONFIG_FILE
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig, RunConfig, TrainConfig
from smallm.train.resolve import NOT_INHERITED

__all__ = [
    "DPO_FIELDS", "FINETUNE_FIELDS", "KINDS", "REWARD_FIELDS", "TRAIN_FIELDS", "RunKind", "kind_named",
    "ready_to_run", "saved_settings",
]  # fmt: skip

TRAIN_FIELDS = (
    "data", "out", "preset", "max_steps", "batch_size", "seq_len", "lr", "warmup_steps", "eval_every",
    "checkpoint_every", "device", "precision", "seed", "sample_prompt", "force",
)  # fmt: skip
"""The settings the dashboard shows for pretraining; the others keep their defaults (or a config file's)."""
FINETUNE_FIELDS = (
    "init_from", "data", "out", "max_steps", "epochs", "batch_size", "grad_accum", "seq_len", "lr", "lora_r",
    "lora_alpha", "quantize", "activation_checkpointing", "eval_every", "checkpoint_every", "precision", "device",
    "seed", "sample_prompt", "force",
)  # fmt: skip
"""The settings shown for SFT: ``init_from`` is the base (a run, checkpoint or Hub id), LoRA with ``lora_r``,
QLoRA with ``quantize``."""
DPO_FIELDS = (*FINETUNE_FIELDS[:9], "beta", *FINETUNE_FIELDS[9:])
"""SFT's, and DPO's ``beta``."""
REWARD_FIELDS = tuple(name for name in FINETUNE_FIELDS if name != "sample_prompt")
"""SFT's but the sample prompt: a reward model's sample is the scores of a training pair."""

FINETUNE_LABELS = {"init_from": "base"}
FINETUNE_PLACEHOLDERS = {"init_from": "a run, checkpoint or Hub id", "data": "a JSON Lines file"}


@dataclasses.dataclass(frozen=True)
class RunKind:
    """One kind of run: its configuration class and how the dashboard shows it."""

    name: str
    title: str
    config_class: type[RunConfig]
    fields: tuple[str, ...]
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    placeholders: Mapping[str, str] = dataclasses.field(default_factory=dict)
    panel: str = "chat"
    """How its result is tried: ``generate`` (a prompt continued), ``chat`` (a conversation), or ``""`` (a
    reward model: its sample is the scores of a pair)."""
    preference: bool = False
    """Whether it logs a preference accuracy and margin (drawn below the loss)."""


KINDS = {
    "pretrain": RunKind("pretrain", "pretraining (smallm-train)", TrainConfig, TRAIN_FIELDS,
                        placeholders={"data": "the built-in corpus"}, panel="generate"),
    "sft": RunKind("sft", "supervised fine-tuning (smallm-sft)", FinetuneConfig, FINETUNE_FIELDS, FINETUNE_LABELS,
                   FINETUNE_PLACEHOLDERS),
    "dpo": RunKind("dpo", "preference optimization (smallm-dpo)", DPOConfig, DPO_FIELDS, FINETUNE_LABELS,
                   FINETUNE_PLACEHOLDERS, preference=True),
    "rm": RunKind("rm", "reward model (smallm-rm)", RewardConfig, REWARD_FIELDS, FINETUNE_LABELS,
                  FINETUNE_PLACEHOLDERS, panel="", preference=True),
}  # fmt: skip
"""Every kind of run the dashboard trains, by the name ``Dashboard(kind=...)`` takes."""


def kind_named(name: str) -> RunKind:
    """The kind called ``name``; ``ValueError`` listing the kinds otherwise."""
    if name not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


def ready_to_run(cfg: RunConfig, given: Iterable[str]) -> RunConfig:
    """``cfg`` (checked) as the console script would train it: with ``resume``, every setting not ``given``
    taken from the run it continues (:func:`~smallm.train.resolve.resumed_settings`); for fine-tuning, the
    base (``init_from``) as the local folder it names, a Hub id downloaded or found in the cache and imported
    once (:func:`~smallm.interop.hub.resolve_model`, raising the command line's message when it names nothing)."""
    from smallm.interop.hub import resolve_model
    from smallm.train.resolve import resumed_settings

    if cfg.resume:
        cfg = resumed_settings(cfg, set(given))
    if isinstance(cfg, FinetuneConfig):
        cfg = dataclasses.replace(cfg, init_from=str(resolve_model(cfg.init_from or "")))
    return cfg


def saved_settings(run: str | Path) -> tuple[RunKind, dict[str, Any]]:
    """The kind of the run directory ``run`` and the settings its ``config.json`` records, but the ones a
    continued run never takes from there (its place, the device)."""
    config_path = Path(run) / CONFIG_FILE
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        kind = KINDS[(saved.get("finetune") or {}).get("method", "pretrain")]
        train = dict(saved["train"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{config_path}: not a smallm run's config.json ({e})") from e
    known = {f.name for f in dataclasses.fields(kind.config_class)}
    return kind, {k: v for k, v in train.items() if k in known and k not in NOT_INHERITED}
