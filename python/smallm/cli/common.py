"""What the console scripts share: turning errors into an exit code, warnings into plain lines, and the
flags that open a model.

Every ``main`` runs its body through :func:`run_command`: a :class:`~smallm.errors.SmallmError` (and the
``ValueError``/``OSError`` of bad arguments or an unreadable file) becomes ``PROG: error: message`` on
stderr and exit code 1, never a traceback; Ctrl-C becomes exit code 130 with what the command keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from smallm.errors import SmallmError

__all__ = [
    "INTERRUPTED", "add_model_arguments", "add_sampling_arguments", "checkpoint_of", "load", "plain_warnings", "report",
    "run_command", "sampling_from",
]  # fmt: skip

DTYPES = ("auto", "fp32", "bf16", "fp16")
INTERRUPTED = "interrupted; resume from the last checkpoint with --resume"
"""What a training command says on Ctrl-C."""


def run_command(
    prog: str,
    body: Callable[[], int],
    *,
    on_interrupt: str = "interrupted",
    always_warn: tuple[type[Warning], ...] = (),
) -> int:
    """``body()``'s exit code; 1 with the message for a known failure, 130 (and ``on_interrupt``) on
    Ctrl-C. Warnings print as plain lines, those of the ``always_warn`` classes every time."""
    try:
        with plain_warnings(prog, always_warn):
            return body()
    except (SmallmError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: {on_interrupt}", file=sys.stderr)
        return 130


@contextmanager
def plain_warnings(prog: str, always: tuple[type[Warning], ...] = ()) -> Iterator[None]:
    """Warnings as ``prog: warning: message`` lines on stderr; those of the ``always`` classes each time
    they occur, not only the first."""
    with warnings.catch_warnings():
        for category in always:
            warnings.simplefilter("always", category)
        warnings.showwarning = lambda message, *_args, **_kw: print(f"{prog}: warning: {message}", file=sys.stderr)
        yield


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """CKPT (or a Hub id), --revision, --prefer, --device and --dtype (and the program's name, for
    :func:`load`'s line)."""
    p.set_defaults(prog=p.prog)
    p.add_argument(
        "checkpoint", metavar="CKPT",
        help="a run directory (its latest checkpoint), a checkpoint, or a Hugging Face Hub model id NAMESPACE/NAME",
    )  # fmt: skip
    p.add_argument("--revision", help="with a Hub id: the branch, tag or commit (default: main)")
    p.add_argument("--prefer", choices=("latest", "best"), default="latest", help="which checkpoint of a run")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype; auto: bf16 on CUDA, else fp32")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The :class:`~smallm.inference.generate.SamplingConfig` fields as flags, and --seed."""
    from smallm.inference.generate import SamplingConfig
    from smallm.options import add_dataclass_arguments

    group = p.add_argument_group("sampling")
    add_dataclass_arguments(group, SamplingConfig)
    group.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")


def sampling_from(args: argparse.Namespace, **defaults: Any) -> Any:
    """The SamplingConfig of the flags given, over ``defaults`` (over the dataclass's own)."""
    from smallm.inference.generate import SamplingConfig

    names = [f.name for f in dataclasses.fields(SamplingConfig)]
    values = {**defaults, **{n: getattr(args, n) for n in names if hasattr(args, n)}}
    return SamplingConfig(**values)


def checkpoint_of(args: argparse.Namespace) -> Path:
    """The checkpoint directory ``args.checkpoint`` names (a run's ``--prefer`` one; a Hub id fetched or
    found in the cache, at ``--revision``)."""
    from smallm.interop.hub import resolve_model
    from smallm.run.load import resolve_checkpoint

    return resolve_checkpoint(resolve_model(args.checkpoint, args.revision), prefer=args.prefer)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer of ``args.checkpoint`` on the chosen device and dtype."""
    import torch

    from smallm.run.load import load_model
    from smallm.train.distributed import resolve_device

    checkpoint = checkpoint_of(args)
    print(f"{args.prog}: opening {checkpoint}", file=sys.stderr)
    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if args.dtype == "auto" and torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    model, tokenizer, _ = load_model(checkpoint, device=device, dtype=dtype)
    return model, tokenizer


def report(result: dict[str, Any], sample: str = "sample") -> None:
    """The last metrics, where the run is, and the sample generated at the end (rank 0 has it)."""
    if "sample" in result:
        shown = {k: v for k, v in result.items() if k not in ("sample", "out")}
        summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in shown.items()}
        print(f"final: {json.dumps(summary)}")
        print(f"checkpoints, metrics.jsonl and loss_curve.png are in {result['out']}")
        print(f"{sample}:\n" + result["sample"])
