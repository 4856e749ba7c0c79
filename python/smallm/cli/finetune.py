"""``smallm-sft`` and ``smallm-dpo``: fine-tune a checkpoint on conversations or preference pairs.

    smallm-sft runs/124m --data chats.jsonl --out runs/124m-sft                    # full fine-tuning
    smallm-sft runs/124m --data chats.jsonl --out runs/124m-lora --lora-r 16       # LoRA, all linear layers
    smallm-sft runs/1b --data chats.jsonl --out runs/1b-qlora --lora-r 16 --quantize nf4 --precision bf16
    smallm-dpo runs/124m-sft --data pairs.jsonl --out runs/124m-dpo --beta 0.1
    smallm-sft runs/124m --data chats.jsonl --out runs/124m-sft --resume           # continue the run
    smallm-sft runs/1b --data chats.jsonl --lora-r 16 --dry-run --fit-memory 16    # memory and time, no run

A LoRA run's checkpoints hold the adapter; ``smallm-generate``, ``smallm-chat``, ``smallm-eval`` and
``smallm-export`` merge it into the base on load, ``smallm-merge`` writes the merged model, and
``RUN/adapter/`` is the adapter in peft's format.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from smallm.cli.common import INTERRUPTED, report, run_command
from smallm.options import add_dataclass_arguments, read_config_file
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig, build_config

CONFIGS = {"sft": FinetuneConfig, "dpo": DPOConfig, "rm": RewardConfig}
DESCRIPTIONS = {"sft": "Supervised fine-tuning of", "dpo": "Direct preference optimization of",
                "rm": "A reward model (Bradley-Terry) trained from"}  # fmt: skip


def build_parser(method: str) -> argparse.ArgumentParser:
    what = (
        'conversations ({"messages": [...]} per line)'
        if method == "sft"
        else ('preference pairs ({"prompt", "chosen", "rejected"} per line)')
    )  # a reward model learns from pairs like DPO
    p = argparse.ArgumentParser(
        prog=f"smallm-{method}",
        description=f"{DESCRIPTIONS[method]} a smallm checkpoint on {what}, in full or with LoRA/QLoRA adapters.",
    )
    p.add_argument(
        "checkpoint",
        help="the model to start from: a run directory (its latest checkpoint), a checkpoint, or a Hugging Face "
        "Hub model id NAMESPACE/NAME (imported once into smallm's cache)",
    )
    p.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    p.add_argument("--config", type=Path, help="a TOML or JSON file of settings (flags override it)")
    add_dataclass_arguments(p, CONFIGS[method])
    return p


def parse_config(method: str, argv: Sequence[str] | None) -> Any:
    args = vars(build_parser(method).parse_args(argv))
    config_file = args.pop("config", None)
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    values.update(args)
    from smallm.interop.hub import resolve_model

    revision = values.pop("revision", None)
    values["init_from"] = values.pop("checkpoint")
    cfg = build_config(CONFIGS[method], values, str(config_file) if config_file else "command line")
    if cfg.resume:
        from smallm.train.resolve import resumed_settings

        cfg = resumed_settings(cfg, set(values))
    # The settings are checked first; then a Hub id becomes the local run it names (fetched or cached).
    return replace(cfg, init_from=str(resolve_model(cfg.init_from, revision)))


def run(method: str, argv: Sequence[str] | None) -> int:
    def body() -> int:
        cfg = parse_config(method, argv)
        if cfg.dry_run:
            from smallm.train.plan import plan_run

            print(plan_run(cfg).text())
            return 0
        from smallm.train.jobs import run as run_job

        report(run_job(cfg), sample="sample reply")
        return 0

    return run_command(f"smallm-{method}", body, on_interrupt=INTERRUPTED)


def sft_main(argv: Sequence[str] | None = None) -> int:
    return run("sft", argv)


def dpo_main(argv: Sequence[str] | None = None) -> int:
    return run("dpo", argv)


def rm_main(argv: Sequence[str] | None = None) -> int:
    return run("rm", argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else "sft", sys.argv[2:]))
