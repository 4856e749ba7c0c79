"""``smallm-train``: pretrain a LLaMA-style model on shards from ``smallm-tokenize``.

    smallm-train                                  # the built-in demo: the Python stdlib, the tiny preset
    smallm-train --data DIR --out RUN --preset 124m --max-steps 5000
    smallm-train --config run.toml --lr 1e-3      # a file, then flags on top of it
    smallm-train --data DIR --out RUN --resume    # continue from RUN's latest checkpoint
    smallm-train --data DIR --preset 350m --dry-run
    torchrun --nproc_per_node 8 -m smallm.cli.train --data DIR --out RUN --preset 350m
    smallm-train --data ko/:0.6 --data en/:0.3 --data code/:0.1 --out RUN   # a mixture (all one tokenizer)
    smallm-train --config examples/tinyllama_stages.toml                     # [[stage]]s: TinyLlama v1.1's recipe

With no ``--data``, the Python standard library sources of this interpreter (about 12 MB of code, on
every machine) are tokenized and packed once into a user cache directory and used as the corpus.
Mixtures, stages and what they log: :mod:`smallm.train.tasks.lm`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smallm.cli.common import INTERRUPTED, report, run_command
from smallm.model.config import ModelConfig
from smallm.options import add_dataclass_arguments, read_config_file
from smallm.train.config import TrainConfig, build_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallm-train",
        description="Pretrain a LLaMA-style language model. With no arguments: a few-minute demo on the "
        "Python standard library sources.",
    )
    p.add_argument("--config", type=Path, help="a TOML or JSON file of settings (flags override it)")
    add_dataclass_arguments(p, TrainConfig)
    model = p.add_argument_group("model shape (overrides of the preset)")
    add_dataclass_arguments(model, ModelConfig, prefix="model-")
    return p


def parse_config(argv: Sequence[str] | None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    source = str(config_file) if config_file else "command line"
    model = values.pop("model", {})
    if not isinstance(model, dict):
        raise ValueError(f"{source}: model must be a table of the model's settings ([model] with n_layer = 8, ...), "
                         f"got {model!r}")  # fmt: skip
    model = dict(model)
    for key in list(args):
        if key.startswith("model_"):
            model[key[len("model_") :]] = args.pop(key)
    values.update(args)
    given = set(values) | ({"model"} if model else set())
    values["model"] = model
    cfg = build_config(TrainConfig, values, source)
    if not cfg.resume:
        return cfg
    from smallm.train.resolve import resumed_settings

    return resumed_settings(cfg, given)


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        cfg = parse_config(argv)
        if cfg.dry_run:
            return dry_run(cfg)
        from smallm.train.jobs import run as run_job

        report(run_job(cfg))
        return 0

    return run_command("smallm-train", body, on_interrupt=INTERRUPTED)


def dry_run(cfg: TrainConfig) -> int:
    """Prints the run's resolved settings, its parameters, FLOPs and memory, the time of a step (measured here
    when quick, estimated on named GPUs) and what would make it fit, and trains nothing."""
    import torch

    from smallm.train.distributed import resolve_device
    from smallm.train.memory import describe_run
    from smallm.train.resolve import model_config_of, resolve

    world = int(os.environ.get("WORLD_SIZE", "1"))
    # A plan for a GPU may be made on a machine without one: the device named is taken as it is.
    device = resolve_device("auto") if cfg.device == "auto" else torch.device(cfg.device)
    given, cfg = cfg, resolve(cfg, device, world)
    print("settings: " + json.dumps(asdict(cfg), sort_keys=True), file=sys.stderr)
    mc = model_config_of(cfg)
    optimizer = {"paged-adamw": "adamw"}.get(cfg.optimizer, cfg.optimizer)
    print(
        describe_run(mc, cfg.batch_size, cfg.seq_len, cfg.precision, world_size=world, fsdp=cfg.fsdp,
                     optimizer=optimizer, step_tokens=cfg.batch_tokens)
    )  # fmt: skip
    if world == 1:  # the time of a step and whether it fits, as every kind of run's plan gives them
        from smallm.train.plan import plan_run

        plan = plan_run(given)  # as given: a GPU's row resolves "auto" for that GPU
        print("\n" + plan.time_table() + "\n\n" + plan.fit_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
