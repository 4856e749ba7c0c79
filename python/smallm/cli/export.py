"""``smallm-export``: a checkpoint as a Hugging Face ``transformers`` LLaMA folder, or as a GGUF file for llama.cpp.

    smallm-export runs/124m --out hf/124m                        # the run's latest checkpoint
    smallm-export runs/124m --best --out hf/124m --dtype bf16    # its best by validation loss, in bf16
    smallm-export runs/124m/checkpoints/step_00005000 --out hf/124m --force
    smallm-export runs/124m --format gguf --out 124m.gguf --dtype q8_0   # for llama.cpp, Ollama, LM Studio

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
without smallm (:mod:`smallm.hf` lists its files); ``smallm-push`` uploads it to the Hub. The GGUF file
(:mod:`smallm.gguf_export`) runs in llama.cpp as is: ``llama-cli -m 124m.gguf``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    from smallm.gguf_export import GGUF_DTYPES
    from smallm.hf import DTYPES

    p = argparse.ArgumentParser(
        prog="smallm-export",
        description="Write a smallm checkpoint as a Hugging Face transformers LLaMA folder (weights, config, "
        "generation config, tokenizer, chat template), or as one GGUF file for llama.cpp.",
    )
    p.add_argument("checkpoint", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="a transformers folder (hf, default) or gguf")
    p.add_argument("--out", required=True, type=Path, help="the folder (hf) or file (gguf) to write")
    p.add_argument(
        "--force", action="store_true",
        help="replace --out if it exists; gguf: also write a tokenizer whose split pattern llama.cpp lacks",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=tuple(dict.fromkeys((*DTYPES, *GGUF_DTYPES))),
        help="type of the stored weights (default: fp32, as trained); q8_0 for gguf only",
    )  # fmt: skip
    p.add_argument("--best", action="store_true", help="a run directory's best checkpoint instead of its latest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.hf import export_hf
    from smallm.runs import resolve_checkpoint

    args = build_parser().parse_args(argv)

    def body() -> int:
        checkpoint = resolve_checkpoint(args.checkpoint, prefer="best" if args.best else "latest")
        if args.format == "gguf":
            from smallm.gguf_export import export_gguf

            dtype = args.dtype or "fp32"
            out = export_gguf(checkpoint, args.out, dtype=dtype, force=args.force, allow_other_pattern=args.force)
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {dtype}) from {checkpoint}: "
                  f"run it with llama.cpp, e.g. llama-cli -m {out}")  # fmt: skip
            return 0
        if args.dtype == "q8_0":
            raise ValueError("--dtype q8_0 is for --format gguf; a transformers folder takes fp32, bf16 or fp16")
        out = export_hf(checkpoint, args.out, force=args.force, dtype=args.dtype)
        loader = f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
        print(f"wrote {out} from {checkpoint}: load it with {loader}")
        return 0

    return run_command("smallm-export", body)


if __name__ == "__main__":
    sys.exit(main())
