"""``smallm-export``: a checkpoint as a Hugging Face ``transformers`` LLaMA folder, or as a GGUF file for llama.cpp.

    smallm-export runs/124m --out hf/124m                        # the run's latest checkpoint
    smallm-export runs/124m --best --out hf/124m --dtype bf16    # its best by validation loss, in bf16
    smallm-export runs/124m/checkpoints/step_00005000 --out hf/124m --force
    smallm-export runs/124m --format gguf --out gguf/124m.gguf --dtype q4_k_m   # llama.cpp, Ollama, LM Studio
    smallm-export runs/124m --format gguf --out gguf/124m.gguf --dtype q4_k_m --imatrix-data calibration.txt
    smallm-export runs/rm --out hf/rm                             # a reward model: LlamaForSequenceClassification
    smallm-export runs/lora --adapter --out hf/lora-adapter       # a LoRA run's adapter alone (peft)

What is written depends on what the run is (:mod:`smallm.interop.export`): a language model loads with
``AutoModelForCausalLM.from_pretrained(DIR)``, a reward model (``smallm-rm``) with
``AutoModelForSequenceClassification``, both with ``AutoTokenizer.from_pretrained(DIR)``, without smallm;
a LoRA run is merged into its base, or with ``--adapter`` written as the adapter alone. ``smallm-push``
uploads a folder to the Hub. The GGUF file runs in llama.cpp as is (``llama-cli -m gguf/124m.gguf``), and
the ``Modelfile`` written beside it lets Ollama take the folder as it is (``cd gguf && ollama create 124m``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    from smallm.interop.export import FORMATS
    from smallm.interop.gguf_export import GGUF_DTYPES
    from smallm.interop.hf_export import DTYPES

    p = argparse.ArgumentParser(
        prog="smallm-export",
        description="Write a smallm checkpoint as a Hugging Face transformers folder (weights, config, generation "
        "config, tokenizer, chat template; a reward model as a sequence classifier), as one GGUF file for "
        "llama.cpp, or a LoRA run's adapter in peft's layout.",
    )
    p.add_argument("checkpoint", type=Path, help="a run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--format", choices=FORMATS, default="hf", help="a transformers folder (hf, default) or gguf")
    p.add_argument("--out", required=True, type=Path, help="the folder (hf) or file (gguf) to write")
    p.add_argument(
        "--force", action="store_true",
        help="replace an earlier export at --out; gguf: also write a tokenizer whose split pattern llama.cpp lacks",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=tuple(dict.fromkeys((*DTYPES, *GGUF_DTYPES))),
        help="type of the stored weights (default: fp32, as trained); gguf also q8_0, and q4_0, q4_k_m, q5_k_m, "
        "q6_k by llama.cpp's quantizer (the llamacpp extra)",
    )  # fmt: skip
    p.add_argument(
        "--imatrix-data", type=Path, metavar="FILE",
        help="gguf k-quants: a calibration text; llama.cpp's quantizer then weighs each column by its activations",
    )  # fmt: skip
    p.add_argument("--no-modelfile", action="store_true", help="gguf: no Ollama Modelfile beside the file")
    p.add_argument("--best", action="store_true", help="a run directory's best checkpoint instead of its latest")
    p.add_argument("--adapter", action="store_true", help="a LoRA run: its adapter alone (peft), not the merged model")
    return p


LOADERS = {
    "language model": "transformers.AutoModelForCausalLM.from_pretrained({out!r})",
    "reward model": "transformers.AutoModelForSequenceClassification.from_pretrained({out!r})",
    "adapter": "peft.PeftModel.from_pretrained(BASE_MODEL, {out!r})",
}


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.interop.export import export_run

    args = build_parser().parse_args(argv)

    def body() -> int:
        done = export_run(
            args.checkpoint, args.out, format=args.format, dtype=args.dtype, prefer="best" if args.best else "latest",
            adapter=args.adapter, force=args.force, allow_other_pattern=args.force, imatrix_data=args.imatrix_data,
            modelfile=not args.no_modelfile,
        )  # fmt: skip
        out = done.path
        if args.format == "gguf":
            print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype or 'fp32'}) from {done.checkpoint}: "
                  f"run it with llama.cpp, e.g. llama-cli -m {out}")  # fmt: skip
            if not args.no_modelfile:
                print(f"wrote {out.parent / 'Modelfile'} for Ollama: cd {out.parent} && ollama create NAME")
        else:
            print(f"wrote the {done.what} of {done.checkpoint} to {out}: load it with "
                  + LOADERS[done.what].format(out=str(out)))  # fmt: skip
        return 0

    return run_command("smallm-export", body)


if __name__ == "__main__":
    sys.exit(main())
