"""Fine-tuning a trained model: SFT on chat conversations and DPO on preference pairs, each in full or
through LoRA adapters (QLoRA: over a 4-bit NF4 base).

Both are :class:`smallm.trainer.Trainer` subclasses, so they share its loop: gradient accumulation with
the loss normalized by the tokens (SFT) or pairs (DPO) of the whole step across micro-batches and ranks,
warm-up and cosine schedule, clipping, mixed precision, DDP, checkpoints with exact resume,
``metrics.jsonl``, TensorBoard/W&B and the loss plot.

* SFT (:class:`SFTTrainer`): conversations rendered as ChatML and packed several per row, each
  attending only to itself (see :mod:`smallm.conversations`); the loss covers the assistant replies.
* DPO (:class:`DPOTrainer`, Rafailov et al. 2023): for each pair, with log-probabilities of the
  answers summed over their tokens, ``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``.
  The reference is the starting model, frozen: under LoRA the same network with its adapters disabled
  (no second copy), otherwise a copy made before training. Logged: the implicit rewards
  ``beta * (pi - ref)`` of chosen and rejected answers, their margin and the preference accuracy
  (how often the chosen answer's reward is the higher).

A LoRA run's checkpoints store the adapter only (plus optimizer and data position); its ``config.json``
names the base checkpoint, and :func:`smallm.runs.load_model` (so ``smallm-generate``, ``-chat``,
``-eval`` and ``-export``) merges the adapter into that base on load. At the end the adapter is also
written in peft's layout to ``RUN/adapter/``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from smallm.chat import chatml_ids
from smallm.checkpoint import load_weights
from smallm.config import TrainConfig, doc
from smallm.conversations import (
    EncodedPair,
    Messages,
    PackedRows,
    PairBatches,
    RowBatches,
    encode_conversation,
    encode_pairs,
    pack_examples,
    pair_tensors,
    read_conversations,
    read_pairs,
)
from smallm.lora import (
    LoraSettings,
    adapter_state,
    apply_lora,
    load_adapter,
    place_frozen_base,
    quantize_nf4,
    save_adapter,
)
from smallm.runs import find_tokenizer, load_model, read_config
from smallm.tokenizer import Tokenizer
from smallm.trainer import Trainer, make_optimizer, param_groups, run_to_end

__all__ = ["DPOTrainer", "FinetuneConfig", "SFTTrainer", "finetune"]

DEFAULT_LR = {("sft", False): 2e-5, ("sft", True): 2e-4, ("dpo", False): 1e-6, ("dpo", True): 2e-5}
"""Peak learning rates by (method, LoRA): adapters start from zero and take larger steps."""


@dataclass
class FinetuneConfig(TrainConfig):
    """How to fine-tune: the base checkpoint (``init_from``), the JSON Lines data, LoRA/QLoRA, DPO."""

    data: str | None = doc("JSON Lines file: conversations (smallm-sft) or preference pairs (smallm-dpo)", None)
    out: str = doc("run directory for checkpoints, metrics.jsonl, config, plots and the adapter", "runs/finetune")
    max_steps: int = doc("optimizer steps (0: as many as --epochs take)", 0)
    epochs: float = doc("passes over the training data when --max-steps is 0", 1.0)
    warmup_steps: int = doc("steps of linear warm-up from 0 to the peak", 10)
    weight_decay: float = doc("AdamW weight decay, applied to 2-D weights only", 0.0)
    lr: float | None = doc("peak learning rate (default: 2e-5 full / 2e-4 LoRA for SFT, 1e-6 / 2e-5 for DPO)", None)
    val_data: str | None = doc("validation file in the same format (default: hold out --val-fraction)", None)
    val_fraction: float = doc("share of the data held out for validation when no --val-data (0: none)", 0.05)
    lora_r: int = doc("LoRA rank (0: full fine-tuning of every weight)", 0)
    lora_alpha: float | None = doc("LoRA scale numerator: updates are scaled by alpha / r (default: 2 * r)", None)
    lora_dropout: float = doc("dropout on the LoRA input (costs a random mask per adapted layer and step)", 0.0)
    lora_targets: str = doc("layers given adapters: all-linear, or a list like q_proj,v_proj", "all-linear")
    lora_train_embeddings: bool = doc(
        "LoRA: also train the embedding table and lm_head in full (small or briefly trained bases need it; "
        "the run is then merged with smallm-merge rather than applied as a peft adapter)",
        False,
    )
    quantize: str = doc("none, or nf4: QLoRA, the frozen base in 4-bit NF4 (needs --lora-r)", "none")
    optimizer: str = doc("adamw, paged-adamw (bitsandbytes, CUDA) or auto (paged under QLoRA on CUDA)", "auto")
    beta: float = doc("DPO: strength of the pull towards the reference model", 0.1)
    method: str = field(default="sft", metadata={"help": "sft or dpo (set by the command)", "cli": False})
    init_from: str | None = field(default=None, metadata={"help": "the checkpoint to fine-tune", "cli": False})
    preset: str = field(default="tiny", metadata={"help": "unused: the shape is the checkpoint's", "cli": False})
    sampling: str = field(default="random", metadata={"help": "unused: rows are packed conversations", "cli": False})
    dry_run: bool = field(default=False, metadata={"help": "unused", "cli": False})

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[(self.method, self.lora_r > 0)]

    def lora(self) -> LoraSettings | None:
        if self.lora_r == 0:
            return None
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r
        targets = LoraSettings.parse_targets(self.lora_targets)
        return LoraSettings(self.lora_r, alpha, self.lora_dropout, targets)

    def validate(self) -> None:
        positive = ("batch_size", "grad_accum", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ValueError("max_steps must be positive, or 0 with a positive --epochs")
        if not self.init_from:
            raise ValueError("fine-tuning starts from a checkpoint: give CKPT (a run or checkpoint directory)")
        if not self.data:
            raise ValueError("--data: the JSON Lines file to fine-tune on is required")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.lora_r < 0:
            raise ValueError(f"lora_r must be 0 (full fine-tuning) or positive, got {self.lora_r}")
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"quantize must be none or nf4, got {self.quantize!r}")
        if self.quantize == "nf4" and self.lora_r == 0:
            raise ValueError("--quantize nf4 (QLoRA) trains adapters over a frozen 4-bit base: give --lora-r too")
        if self.optimizer not in ("auto", "adamw", "paged-adamw"):
            raise ValueError(f"optimizer must be auto, adamw or paged-adamw, got {self.optimizer!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.method not in ("sft", "dpo"):
            raise ValueError(f"method must be sft or dpo, got {self.method!r}")
        if self.lora_train_embeddings and (not self.lora_r or self.method == "dpo"):
            raise ValueError(
                "--lora-train-embeddings goes with --lora-r in smallm-sft (DPO's reference is the base with "
                "the adapters disabled, which must keep the starting embeddings)"
            )
        if self.lora_r and self.fsdp:
            raise ValueError("--fsdp shards full fine-tuning; LoRA runs replicate the small adapters with DDP")
        if self.lora_r:
            self.lora().validate()  # type: ignore[union-attr]
        if not 0 <= self.min_lr_ratio <= 1 or self.peak_lr() <= 0 or self.warmup_steps < 0:
            raise ValueError("min_lr_ratio must be in [0, 1], lr positive and warmup_steps not negative")


def held_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded random ``fraction`` of the items (at least one) held out, when
    there are at least 20 items and a positive fraction; otherwise no validation."""
    if fraction <= 0 or len(items) < 20:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, round(fraction * len(items)))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


class SFTTrainer(Trainer):
    """Supervised fine-tuning on conversations; see the module docstring."""

    cfg: FinetuneConfig

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.peft: Any = None
        self.settings = cfg.lora()
        super().__init__(cfg)

    # ----- data -----------------------------------------------------------------------------------

    def setup_data(self) -> Tokenizer:
        assert self.init is not None
        tokenizer = find_tokenizer(self.init, read_config(self.init))
        self.train_items, self.val_items = self.read_items(Path(self.cfg.data or ""))
        return tokenizer

    def read_items(self, path: Path) -> tuple[list[Any], list[Any]]:
        items = read_conversations(path)
        if self.cfg.val_data:
            return items, read_conversations(self.cfg.val_data)
        return held_out(items, self.cfg.val_fraction, self.cfg.seed)

    def _pad_id(self) -> int:
        return self.tokenizer.eot_token if self.tokenizer.eot_token is not None else 0

    def _pack(self, conversations: list[Messages], what: str) -> PackedRows:
        examples = [encode_conversation(self.tokenizer, m) for m in conversations]
        rows = pack_examples(examples, self.seq_len, self._pad_id())
        if rows.dropped:
            warnings.warn(
                f"{rows.dropped} of {len(conversations)} {what} conversations are longer than the context of "
                f"{self.seq_len} tokens (or supervise nothing) and were left out",
                stacklevel=2,
            )
        if len(rows) == 0 and what == "training":
            raise ValueError(f"{self.cfg.data}: no conversation fits in {self.seq_len} tokens; raise --seq-len")
        return rows

    def make_loader(self) -> RowBatches:
        rows = self._pack(self.train_items, "training")
        self.val_rows = self._pack(self.val_items, "validation") if self.val_items else None
        self.log(
            f"{len(self.train_items)} conversations in {len(rows)} rows of {self.seq_len} tokens "
            f"({rows.fill:.0%} filled), {rows.supervised_tokens} supervised tokens"
        )
        self._count_steps(len(rows))
        return RowBatches(
            rows, self.cfg.batch_size, seed=self.cfg.seed, rank=self.rt.rank, world_size=self.rt.world_size,
            device=self.rt.device,
        )  # fmt: skip

    def _count_steps(self, n_items: int) -> None:
        if self.cfg.max_steps == 0:
            per_step = self.cfg.batch_size * self.cfg.grad_accum * self.rt.world_size
            self.cfg.max_steps = max(1, math.ceil(self.cfg.epochs * n_items / per_step))
            self.log(f"{self.cfg.epochs:g} epoch(s) of {n_items} take {self.cfg.max_steps} steps")

    def validation_batches(self) -> list[tuple[torch.Tensor, ...]] | None:
        rows = self.val_rows
        if rows is None or len(rows) == 0:
            return None
        mine = np.arange(self.rt.rank, len(rows), self.rt.world_size)
        B = self.cfg.batch_size
        tensor = lambda a: torch.from_numpy(a).to(self.rt.device)  # noqa: E731
        return [
            (tensor(rows.x[i]), tensor(rows.y[i]), tensor(rows.segments[i]))
            for i in (mine[s : s + B] for s in range(0, len(mine), B))
        ]

    # ----- model ----------------------------------------------------------------------------------

    def frozen_dtype(self) -> torch.dtype:
        """The dtype of frozen base weights under LoRA: the autocast dtype (they are only read through
        it), fp32 without autocast."""
        return self.amp_dtype or torch.float32

    def build_model(self) -> nn.Module:
        assert self.init is not None
        model = load_model(self.init)[0].train()  # a LoRA run's adapter is merged into its base
        self.log(f"fine-tuning {self.init} ({model.num_parameters() / 1e6:.1f}M parameters)")
        if self.settings is None:
            return model.to(self.rt.device)
        if self.cfg.quantize == "nf4":
            size = quantize_nf4(model, self.rt.device, self.frozen_dtype())
            self.log(f"block weights quantized to NF4: {size / 2**20:.1f} MiB")
        place_frozen_base(model, self.rt.device, self.frozen_dtype())
        self.peft = apply_lora(model, self.settings)
        if self.cfg.lora_train_embeddings:
            for p in self.embedding_weights().values():
                p.data = p.data.float()  # trained in fp32 like the adapters
                p.requires_grad_(True)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.log(f"LoRA r={self.settings.r} on {','.join(self.settings.targets)}: {trainable / 1e6:.2f}M trainable")
        return model

    def build_optimizer(self) -> torch.optim.Optimizer:
        choice = self.cfg.optimizer
        cuda = self.rt.device.type == "cuda"
        if choice == "auto":
            choice = "paged-adamw" if cuda and self.cfg.quantize == "nf4" and _has_bitsandbytes() else "adamw"
        if choice == "adamw":
            return make_optimizer(self.model, self.cfg, self.rt.device)
        if not cuda or not _has_bitsandbytes():
            raise ValueError("--optimizer paged-adamw needs CUDA and the bitsandbytes package")
        import bitsandbytes as bnb

        groups = param_groups(self.model, self.cfg.weight_decay)
        return bnb.optim.PagedAdamW(groups, lr=self.cfg.peak_lr(), betas=(self.cfg.beta1, self.cfg.beta2))

    def run_config(self) -> dict[str, Any]:
        config = super().run_config()
        config["finetune"] = {"method": self.cfg.method, "base": str(Path(os.path.abspath(self.init or "")))}
        if self.settings is not None:
            config["lora"] = {
                **asdict(self.settings),
                "quantize": self.cfg.quantize,
                "base": config["finetune"]["base"],
                "embeddings": self.cfg.lora_train_embeddings,
            }
        return config

    def embedding_weights(self) -> dict[str, nn.Parameter]:
        """The embedding table and (when not tied to it) lm_head, by their names in a smallm checkpoint."""
        base = self.peft.get_base_model()
        weights = {"model.embed_tokens.weight": base.model.embed_tokens.weight}
        if not self.model_config.tie_embeddings:
            weights["lm_head.weight"] = base.lm_head.weight
        return weights

    def checkpoint_weights(self) -> dict[str, torch.Tensor] | None:
        if self.peft is None:
            return None
        tensors = adapter_state(self.peft)
        if self.cfg.lora_train_embeddings:
            tensors.update(self.embedding_weights())
        return tensors

    def restore_weights(self, checkpoint: Path) -> None:
        tensors = load_weights(checkpoint)
        embeddings = self.embedding_weights() if self.cfg.lora_train_embeddings else {}
        with torch.no_grad():
            for name, p in embeddings.items():
                p.copy_(tensors.pop(name))
        load_adapter(self.peft, tensors, str(checkpoint))

    def fit(self) -> dict[str, Any]:
        result = super().fit()
        if self.peft is not None and self.rt.main:
            if self.cfg.lora_train_embeddings:
                self.log(f"the embeddings were trained too: make the full model with smallm-merge {self.out} --out DIR")
            else:
                folder = save_adapter(self.peft, self.out / "adapter", base=str(self.init))
                self.log(f"adapter (peft format) in {folder}")
        return result

    def sample(self, model: nn.Module) -> str:
        """A reply to ``sample_prompt`` as a user turn, or to the first training conversation's opening."""
        from smallm.generate import generate_ids

        if self.cfg.sample_prompt:
            messages = [{"role": "user", "content": self.cfg.sample_prompt}]
        else:
            first = self.first_prompt()
            messages = first[: next(i for i, m in enumerate(first) if m["role"] == "assistant")]
        prompt = chatml_ids(self.tokenizer, messages, add_generation_prompt=True)
        room = max(1, min(self.cfg.sample_tokens, self.model_config.max_seq_len - len(prompt)))
        ids = generate_ids(
            model, prompt, max_new_tokens=room, seed=0, stop_ids=self._stops(), vocab_size=self.tokenizer.vocab_size
        )
        return self.tokenizer.decode(ids)

    def first_prompt(self) -> Messages:
        return self.train_items[0]

    def _stops(self) -> list[int]:
        specials = self.tokenizer.special_tokens
        return [specials[t] for t in ("<|im_end|>", "<|endoftext|>") if t in specials]


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError where its binaries do not load
        return False
    return True


class DPOTrainer(SFTTrainer):
    """Direct preference optimization against the frozen starting model; see the module docstring."""

    def read_items(self, path: Path) -> tuple[list[Any], list[Any]]:
        items = read_pairs(path)
        if self.cfg.val_data:
            return items, read_pairs(self.cfg.val_data)
        return held_out(items, self.cfg.val_fraction, self.cfg.seed)

    def _encode(self, pairs: list[Any], what: str) -> list[EncodedPair]:
        encoded, dropped = encode_pairs(self.tokenizer, pairs, self.seq_len)
        if dropped:
            warnings.warn(
                f"{dropped} of {len(pairs)} {what} pairs are longer than the context of {self.seq_len} tokens "
                "and were left out",
                stacklevel=2,
            )
        return encoded

    def make_loader(self) -> PairBatches:
        pairs = self._encode(self.train_items, "training")
        if not pairs:
            raise ValueError(f"{self.cfg.data}: no pair fits in {self.seq_len} tokens; raise --seq-len")
        self.val_pairs = self._encode(self.val_items, "validation")
        self.log(f"{len(pairs)} preference pairs")
        self._count_steps(len(pairs))
        return PairBatches(
            pairs, self.cfg.batch_size, self._pad_id(), seed=self.cfg.seed, rank=self.rt.rank,
            world_size=self.rt.world_size, device=self.rt.device,
        )  # fmt: skip

    def build_model(self) -> nn.Module:
        if self.cfg.fsdp and self.rt.world_size > 1:
            raise ValueError("smallm-dpo does not shard with --fsdp; use DDP, or LoRA for large models")
        model = super().build_model()
        self.reference: nn.Module | None = None
        if self.peft is None:  # full DPO: a frozen copy of the starting weights
            self.reference = copy.deepcopy(model).to(dtype=self.frozen_dtype()).eval().requires_grad_(False)
        return model

    def first_prompt(self) -> Messages:
        prompt, chosen, _ = self.train_items[0]
        return prompt + chosen

    @contextlib.contextmanager
    def _reference(self) -> Any:
        if self.peft is not None:
            with self.peft.disable_adapter():
                yield self.model
        else:
            yield self.reference

    def sequence_logps(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed log-probability of each row's supervised targets (the answer), fp32."""
        with self.autocast():
            _, losses = net(x, y, reduction="none")
        return -losses.sum(dim=-1)

    def pair_stats(self, x: torch.Tensor, y: torch.Tensor, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed DPO loss, [loss, chosen reward, rejected reward, correct, pairs] sums) of one batch."""
        policy = self.sequence_logps(net, x, y)
        with torch.no_grad(), self._reference() as reference:
            was_training = reference.training
            reference.eval()
            ref = self.sequence_logps(reference, x, y)
            reference.train(was_training)
        B = x.shape[0] // 2
        reward = self.cfg.beta * (policy - ref)  # implicit rewards; only their difference has a gradient
        margin = reward[:B] - reward[B:]
        loss = -F.logsigmoid(margin).sum()
        r = reward.detach()
        stats = torch.stack([loss.detach(), r[:B].sum(), r[B:].sum(), (margin > 0).sum().float(), torch.tensor(B)])
        return loss, stats.double()

    def train_step(self) -> dict[str, float]:
        batches = [next(self.loader) for _ in range(self.cfg.grad_accum)]
        pairs = torch.tensor(float(sum(x.shape[0] // 2 for x, _ in batches)), device=self.rt.device)
        total = self._all_reduce(pairs)
        scale = self.rt.world_size / total  # as in Trainer.train_step: the mean over all pairs of all ranks
        stats = self.backward_micro_batches(batches, scale, lambda batch: self.pair_stats(*batch, self.net))
        self.apply_gradients()
        self.state.tokens_seen += sum(int(x.numel()) for x, _ in batches)
        return _dpo_metrics(self._all_reduce(torch.stack(stats).sum(dim=0)))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_pairs:
            return {}
        mine = self.val_pairs[self.rt.rank :: self.rt.world_size]
        sums = torch.zeros(5, dtype=torch.float64, device=self.rt.device)
        self.model.eval()
        try:
            for s in range(0, len(mine), self.cfg.batch_size):
                x, y = pair_tensors(mine[s : s + self.cfg.batch_size], self._pad_id(), self.rt.device)
                sums += self.pair_stats(x, y, self.model)[1].to(sums.device)
        finally:
            self.model.train()
        metrics = _dpo_metrics(self._all_reduce(sums))
        return {f"val_{k}": v for k, v in metrics.items()}


def _dpo_metrics(sums: torch.Tensor) -> dict[str, float]:
    loss, chosen, rejected, correct, pairs = sums.tolist()
    n = max(pairs, 1.0)
    return {
        "loss": loss / n,
        "reward_chosen": chosen / n,
        "reward_rejected": rejected / n,
        "reward_margin": (chosen - rejected) / n,
        "reward_accuracy": correct / n,
    }


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Runs one SFT or DPO job (one process of it under torchrun)."""
    return run_to_end(DPOTrainer if cfg.method == "dpo" else SFTTrainer, cfg)
