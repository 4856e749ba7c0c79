"""``smallm-import``: a Hugging Face ``LlamaForCausalLM`` (Qwen2, Qwen3, Mistral) folder as a smallm run directory.

    smallm-import hf/some-llama --out runs/some-llama
    smallm-import hf/124m --out runs/124m-back --force      # an export of ours, back again
    smallm-import HuggingFaceTB/SmolLM2-135M --out runs/smollm2   # a Hub id, through huggingface_hub's cache

The run holds one checkpoint (``checkpoints/step_00000000``: the weights, step 0, a fresh optimizer
state) that ``smallm.run.load.load_model`` and the generation and export tools open, and the folder's
BPE ``tokenizer.json`` (byte-level, or SentencePiece-style as Llama 2's) with the roles of its special
tokens (a folder without one gives the weights only, with a warning). Configurations smallm does not implement (other
rotary scalings, other biases, other model types) are refused, naming the field. The checkpoint holds
no training state, so ``smallm-train --resume`` does not continue from it.
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
    p.add_argument(
        "hf_dir",
        help="the folder (config.json, model.safetensors or shards, tokenizer), or a Hugging Face Hub model id "
        "NAMESPACE/NAME, taken from huggingface_hub's cache (downloaded into it when online)",
    )
    p.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    p.add_argument("--out", required=True, type=Path, help="the run directory to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.interop.hf_import import import_hf

    args = build_parser().parse_args(argv)

    def body() -> int:
        from smallm.interop.hub import local_or_download

        run = import_hf(local_or_download(args.hf_dir, args.revision), args.out, force=args.force)
        print(f"wrote the run directory {run}")
        return 0

    return run_command("smallm-import", body, always_warn=(UserWarning,))


if __name__ == "__main__":
    sys.exit(main())
