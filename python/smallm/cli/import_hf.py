"""``smallm-import``: a local Hugging Face ``LlamaForCausalLM`` folder as a smallm run directory.

    smallm-import hf/some-llama --out runs/some-llama
    smallm-import hf/124m --out runs/124m-back --force      # an export of ours, back again

The run holds one checkpoint (``checkpoints/step_00000000``: the weights, step 0, a fresh optimizer
state) that ``smallm.runs.load_model`` and the generation and export tools open, and the folder's
``tokenizer.json`` when it is a smallm byte-level BPE tokenizer (otherwise only the weights come, with
a warning). Configurations smallm does not implement (rotary scaling, biases, other model types) are
refused, naming the field. The checkpoint holds no training state, so ``smallm-train --resume`` does not
continue from it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallm-import",
        description="Read a local Hugging Face LlamaForCausalLM folder (config.json + safetensors) into a "
        "smallm run directory.",
    )
    p.add_argument("hf_dir", type=Path, help="the folder: config.json, model.safetensors (or sharded), tokenizer")
    p.add_argument("--out", required=True, type=Path, help="the run directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.hf_import import import_hf

    args = build_parser().parse_args(argv)

    def body() -> int:
        run = import_hf(args.hf_dir, args.out, force=args.force)
        print(f"wrote the run directory {run}")
        return 0

    return run_command("smallm-import", body, always_warn=(UserWarning,))


if __name__ == "__main__":
    sys.exit(main())
