"""``smallm-export``: a checkpoint as a Hugging Face ``transformers`` LLaMA folder.

    smallm-export runs/124m --out hf/124m                        # the run's latest checkpoint
    smallm-export runs/124m --best --out hf/124m --dtype bf16    # its best by validation loss, in bf16
    smallm-export runs/124m/checkpoints/step_00005000 --out hf/124m --force

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
without smallm (:mod:`smallm.hf` lists its files); ``smallm-push`` uploads it to the Hub.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    from smallm.hf import DTYPES

    p = argparse.ArgumentParser(
        prog="smallm-export",
        description="Write a smallm checkpoint as a Hugging Face transformers LLaMA folder (weights, config, "
        "generation config, tokenizer, chat template).",
    )
    p.add_argument("checkpoint", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="type of the stored weights (default: fp32, as trained)")
    p.add_argument("--best", action="store_true", help="a run directory's best checkpoint instead of its latest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.hf import export_hf
    from smallm.runs import resolve_checkpoint

    args = build_parser().parse_args(argv)

    def body() -> int:
        checkpoint = resolve_checkpoint(args.checkpoint, prefer="best" if args.best else "latest")
        out = export_hf(checkpoint, args.out, force=args.force, dtype=args.dtype)
        loader = f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
        print(f"wrote {out} from {checkpoint}: load it with {loader}")
        return 0

    return run_command("smallm-export", body)


if __name__ == "__main__":
    sys.exit(main())
