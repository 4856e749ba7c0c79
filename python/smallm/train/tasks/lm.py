"""Pretraining: next-token prediction on the shards ``smallm-tokenize`` writes (its train and val splits).

Training rows are random windows or document-aligned rows of the train split
(:class:`smallm.data.loader.TokenLoader`); validation makes every token of the val split a target once
(:class:`smallm.data.loader.ValidationLoader`); the sample continues ``sample_prompt``.

A mixture (several ``--data DIR:WEIGHT``) draws each training row's source by weight; every source must
have been packed with the same tokenizer (the manifests' sha256 of ``tokenizer.json``). Validation runs
over every source's val split, interleaved batch by batch (so ``--eval-batches`` samples them all), and
reports ``val_loss``/``val_bpb`` over all of them and ``val/NAME_loss``/``val/NAME_bpb`` per source; the
training lines carry each source's epoch (``epoch/NAME``).

Stages (``[[stage]]`` in the config, TinyLlama v1.1's recipe): each with its steps, its mixture and its
batch size in tokens, run one after the other in one run directory with one step counter. Each stage has
its own loader (seeded with the run's seed plus its index) and the same micro-batch, so a larger batch
means more gradient accumulation (the gradient is still normalised by the tokens of the whole step); the
stage index is in every training line (``stage``) and in the checkpoint's loader position, so ``--resume``
continues mid-stage exactly. Validation covers every source of every stage, and runs at the end of each
stage as well as every ``--eval-every`` steps; the decay of the learning rate spans the stages marked
``lr = "decay"`` (else the run's ``--decay-fraction``).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from smallm.data.loader import TokenLoader, ValidationLoader
from smallm.data.shards import MANIFEST
from smallm.data.shardset import ShardSet
from smallm.data.sources import data_sources
from smallm.inference.evaluate import byte_length_table, metrics_from_sums
from smallm.inference.generate import generate_text
from smallm.run.load import find_tokenizer, read_config, resolve_checkpoint
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import TrainConfig
from smallm.train.tasks import RunContext, Task
from smallm.train.tasks.tokens import TokenLoss

__all__ = ["Pretraining"]


class Pretraining(Task):
    """The :class:`~smallm.train.tasks.Task` of ``smallm-train``."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        stages = cfg.stage or [{"name": "", "steps": cfg.max_steps, "data": cfg.data, "lr": "stable",
                                "batch_tokens": cfg.step_tokens()}]  # fmt: skip
        self.stages = stages
        self.stage_sources = [data_sources(s["data"]) for s in stages]
        paths = list(dict.fromkeys(path for sources in self.stage_sources for path, _ in sources))
        for path in paths or [cfg.data]:
            if not path or not Path(path).is_dir():
                raise ValueError(f"--data {path}: not a directory; make one with smallm-tokenize CORPUS --out DIR")
        check_one_tokenizer(paths)
        self.paths, self.names = paths, source_names(paths)
        self.train_sets = [ShardSet.open(path, "train", verify=cfg.verify_data) for path in paths]
        val_sets = [ShardSet.open(path, "val", verify=cfg.verify_data) for path in paths]
        self.val_sets = [v if v.num_tokens > 0 else None for v in val_sets]
        self.tokenizer = Tokenizer.load(paths[0])
        self.loader: TokenLoader | StagedBatches | None = None
        self.validation: ValidationLoader | MixtureValidation | None = None  # made once, iterated per evaluation
        self.first_new_id: int | None = None  # of the tokens the data's tokenizer adds to init_from's

    @property
    def mixture(self) -> bool:
        """Whether validation reports several sources."""
        return len(self.names) > 1

    @property
    def staged(self) -> bool:
        return bool(self.cfg.stage)

    def attach(self, context: RunContext) -> TokenLoss:
        self.context = context
        # Bytes of text per id (0 for special tokens) turn a loss in nats per token into bits per byte.
        byte_lengths = byte_length_table(self.tokenizer, context.vocab_size, context.runtime.device)
        if not self.mixture and not self.staged:
            return TokenLoss(byte_lengths, context.amp_dtype)
        return MixtureLoss(byte_lengths, context.amp_dtype, self)

    def _loader(self, stage: int) -> TokenLoader:
        c, sources = self.context, self.stage_sources[stage]
        sets = [self.train_sets[self.paths.index(path)] for path, _ in sources]
        names = [self.names[self.paths.index(path)] for path, _ in sources]
        return TokenLoader(
            sets if len(sets) > 1 else sets[0], c.batch_size, c.seq_len, mode=self.cfg.sampling,
            seed=c.seed + stage, rank=c.runtime.rank, world_size=c.runtime.world_size, device=c.runtime.device,
            weights=[w for _, w in sources], names=names, repeat=self.cfg.repeat,
        )  # fmt: skip

    def train_batches(self) -> TokenLoader | StagedBatches:
        if not self.staged:
            self.loader = self._loader(0)
            return self.loader
        c = self.context
        rows = c.batch_size * c.seq_len * c.runtime.world_size
        micro = []
        for stage in self.stages:
            if stage["batch_tokens"] % rows:
                raise ValueError(
                    f"stage {stage['name']}: batch_tokens {stage['batch_tokens']} is not a multiple of --batch-size "
                    f"{c.batch_size} x seq_len {c.seq_len} x {c.runtime.world_size} rank(s) = {rows} tokens"
                )
            micro.append(stage["batch_tokens"] // rows)
        self.loader = StagedBatches([self._loader(i) for i in range(len(self.stages))], self.stages, micro)
        return self.loader

    def max_steps(self, rows_per_step: int) -> int:
        return self.cfg.max_steps

    def micro_batches_at(self, step: int) -> int | None:
        """Micro-batches of the optimizer step after ``step`` steps: its stage's (None: the run's)."""
        return self.loader.micro_batches[self.loader.stage_at(step)] if isinstance(self.loader, StagedBatches) else None

    def stage_ends_at(self, step: int) -> bool:
        """Whether a stage ends with step ``step`` (validation runs there)."""
        return isinstance(self.loader, StagedBatches) and step in self.loader.ends

    def new_rows_at(self, step: int) -> int | None:
        """The first id of the tokens the data's tokenizer adds to the ``init_from`` model's, when the stage of
        the step after ``step`` steps has ``train = "new-tokens"``."""
        if not isinstance(self.loader, StagedBatches):
            return None
        if self.stages[self.loader.stage_at(step)].get("train", "all") != "new-tokens":
            return None
        if self.first_new_id is None:
            init = resolve_checkpoint(self.cfg.init_from or "")
            self.first_new_id = find_tokenizer(init, read_config(init)).vocab_size
        return self.first_new_id

    def validation_batches(self) -> ValidationLoader | MixtureValidation | None:
        if self.validation is None:
            self.validation = self._validation()
        return self.validation

    def _validation(self) -> ValidationLoader | MixtureValidation | None:
        c = self.context
        loaders = [
            None if v is None else ValidationLoader(
                v, c.batch_size, c.seq_len, rank=c.runtime.rank, world_size=c.runtime.world_size,
                device=c.runtime.device,
            )
            for v in self.val_sets
        ]  # fmt: skip
        if not self.mixture:
            return loaders[0]
        if all(v is None for v in loaders):
            return None
        return MixtureValidation(loaders)

    def sample(self, model: nn.Module) -> str:
        """Text generated from ``sample_prompt`` (temperature 0.8, top-k 50)."""
        return generate_text(model, self.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens, seed=0)

    def run_config(self) -> dict[str, Any]:
        return {}


class StagedBatches:
    """The training batches of a staged run: stage i's loader for its steps, each of its ``micro_batches[i]``
    batches per step. The position is the batches handed out and every stage's loader position."""

    def __init__(self, loaders: list[TokenLoader], stages: list[dict[str, Any]], micro_batches: list[int]) -> None:
        self.loaders, self.stages, self.micro_batches = loaders, stages, micro_batches
        self.ends = list(np.cumsum([s["steps"] for s in stages]).tolist())
        self.batch_ends = list(np.cumsum([s["steps"] * m for s, m in zip(stages, micro_batches)]).tolist())
        self.batches = 0

    def stage_at(self, step: int) -> int:
        """The stage of the optimizer step after ``step`` steps (the last stage past the end)."""
        return min(bisect.bisect_right(self.ends, step), len(self.ends) - 1)

    @property
    def stage(self) -> int:
        """The stage the next batch belongs to."""
        return min(bisect.bisect_right(self.batch_ends, self.batches), len(self.loaders) - 1)

    @property
    def last_stage(self) -> int:
        """The stage of the last batch handed out (that of the step just trained)."""
        return min(bisect.bisect_right(self.batch_ends, max(self.batches - 1, 0)), len(self.loaders) - 1)

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = next(self.loaders[self.stage])
        self.batches += 1
        return batch

    def epochs(self) -> dict[str, float]:
        return self.loaders[self.stage].epochs()

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches, "stage": self.stage, "names": [s["name"] for s in self.stages],
            "micro_batches": list(self.micro_batches), "loaders": [loader.state_dict() for loader in self.loaders],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("micro_batches", [])[: len(self.micro_batches)]
        if saved != self.micro_batches[: len(saved)] or len(state.get("loaders", [])) > len(self.loaders):
            raise ValueError("the loader position is for other stages (batch sizes or stages changed)")
        self.batches = int(state["batches"])
        for loader, position in zip(self.loaders, state["loaders"]):
            loader.load_state_dict(position)


def source_names(paths: list[str]) -> list[str]:
    """A short name per source for metrics: its directory's name, with its parent's when two share one."""
    names = [Path(p).resolve().name or str(p) for p in paths]
    return [f"{Path(p).resolve().parent.name}_{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def check_one_tokenizer(paths: list[str]) -> None:
    """Refuses sources packed with different tokenizers (the sha256 of ``tokenizer.json`` in their
    manifests), naming both directories."""
    seen: list[tuple[str, str]] = []
    for path in paths:
        try:
            digest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))["tokenizer"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # ShardSet.open says what is wrong with it
        for other, other_digest in seen:
            if digest != other_digest:
                raise ValueError(
                    f"--data {path} and {other} were packed with different tokenizers (tokenizer.json sha256 "
                    f"{digest[:12]}... and {other_digest[:12]}...): a mixture's sources must share one tokenizer; "
                    f"pack them with smallm-tokenize --tokenizer {other}"
                )
        seen.append((path, digest))


class MixtureValidation:
    """The val batches of every source, interleaved one batch at a time (sources that end drop out);
    :attr:`order` says which source each batch of a pass comes from."""

    def __init__(self, loaders: list[ValidationLoader | None]) -> None:
        self.loaders = loaders
        sizes = [len(v) if v is not None else 0 for v in loaders]
        self.order = [s for i in range(max(sizes)) for s in range(len(sizes)) if i < sizes[s]]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        iterators = [iter(v) if v is not None else iter(()) for v in self.loaders]
        for source in self.order:
            yield next(iterators[source])


class MixtureLoss(TokenLoss):
    """:class:`TokenLoss` with validation sums per source, and each source's epoch in the training lines."""

    def __init__(self, byte_lengths: Tensor, amp_dtype: torch.dtype | None, task: Pretraining) -> None:
        super().__init__(byte_lengths, amp_dtype)
        self.task = task

    def train_metrics(self, stats: Tensor, count: Tensor) -> dict[str, float]:
        metrics = super().train_metrics(stats, count)
        loader = self.task.loader
        if isinstance(loader, StagedBatches):
            metrics["stage"] = loader.last_stage
        if loader is not None:
            metrics.update({f"epoch/{name}": e for name, e in loader.epochs().items()})
        return metrics

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Tensor:
        """Sums ``[loss, tokens, bytes]`` per source, flattened (source-major); padding batches beyond the
        pass (sharded runs) carry no targets."""
        validation = self.task.validation_batches()  # the pass the trainer iterates: its batches' sources
        order = validation.order if isinstance(validation, MixtureValidation) else []
        sums = torch.zeros(len(self.task.names), 3, dtype=torch.float64, device=self.byte_lengths.device)
        for i, batch in enumerate(batches):
            sums[order[i] if i < len(order) else 0] += super().evaluate(model, [batch])
        return sums.flatten()

    def validation_metrics(self, sums: Tensor) -> dict[str, float]:
        per_source = sums.reshape(len(self.task.names), 3)
        metrics = super().validation_metrics(per_source.sum(0))
        for name, row in zip(self.task.names, per_source):
            m = metrics_from_sums(row)
            if m:
                metrics[f"val/{name}_loss"], metrics[f"val/{name}_bpb"] = m["loss"], m["bits_per_byte"]
        return metrics
