"""``smallm-merge``: fold a LoRA adapter into its base model's weights.

    smallm-merge runs/124m-lora --out runs/124m-merged            # a LoRA run of smallm-sft / smallm-dpo
    smallm-merge adapters/chat --base runs/124m --out runs/merged  # a peft adapter folder
    smallm-export runs/124m-merged --out hf/124m-chat              # then, e.g., to Hugging Face

The output is a smallm run directory (one checkpoint and the tokenizer) that every smallm command and
``smallm-export`` read like any other.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smallm-merge", description="Merge a LoRA adapter into its base model.")
    p.add_argument("adapter", type=Path, help="a LoRA run or checkpoint, or a peft adapter folder")
    p.add_argument("--out", required=True, type=Path, help="the run directory to write")
    p.add_argument("--base", type=Path, help="the base checkpoint (default: the one the LoRA run names)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.run.write import merge_run

    args = build_parser().parse_args(argv)

    def body() -> int:
        out = merge_run(args.adapter, args.out, base=args.base, force=args.force)
        print(f"wrote {out}: the base with the adapter merged in")
        return 0

    return run_command("smallm-merge", body)


if __name__ == "__main__":
    sys.exit(main())
