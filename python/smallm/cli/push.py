"""``smallm-push``: upload an exported folder (``smallm-export``) to the Hugging Face Hub.

    smallm-push hf/124m --repo-id my-org/smallm-124m
    smallm-push hf/124m --repo-id my-org/smallm-124m --private

Needs ``huggingface_hub`` (``pip install 'smallm[hf]'``) and a token: ``huggingface-cli login`` or
``HF_TOKEN``. The folder, the repository id, ``HF_HUB_OFFLINE`` and the token are checked before
anything goes over the network; the repository is created if it does not exist.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallm-push", description="Upload an exported model folder to the Hugging Face Hub."
    )
    p.add_argument("folder", type=Path, help="a folder written by smallm-export")
    p.add_argument("--repo-id", required=True, help="the model repository, NAMESPACE/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--message", default="Upload a smallm export", help="the commit message")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from smallm.interop.hub import push_to_hub

    args = build_parser().parse_args(argv)

    def body() -> int:
        url = push_to_hub(args.folder, args.repo_id, private=args.private, commit_message=args.message)
        print(f"uploaded {args.folder} to {url}")
        return 0

    return run_command("smallm-push", body)


if __name__ == "__main__":
    sys.exit(main())
