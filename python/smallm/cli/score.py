"""``smallm-score``: the reward a reward model (``smallm-rm``) gives each conversation of a file.

    smallm-score runs/rm --data replies.jsonl                 # one JSON line per input, with its "score"
    smallm-score runs/rm --data replies.jsonl --out scored.jsonl

Each line is ``{"messages": [...]}`` ending with an assistant turn, or ``{"prompt": ..., "reply": ...}``;
it is scored as the reward model was trained (the conversation encoded as fine-tuning encodes it) and
written back with a ``score`` field, in order. The mean score goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smallm.cli.common import add_model_arguments, checkpoint_of, load, run_command

PROG = "smallm-score"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Score conversations with a smallm reward model.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, type=Path, help="JSON Lines: {messages} or {prompt, reply} per line")
    p.add_argument("--out", type=Path, help="write the scored lines here (default: stdout)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--batch-size", type=int, default=16, help="conversations per forward pass (default: 16)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from smallm.data.conversations import read_replies
        from smallm.files.destination import claim
        from smallm.inference.scoring import SCORED
        from smallm.run.load import run_dir_of

        if args.batch_size < 1:
            raise ValueError("--batch-size must be positive")
        conversations = read_replies(args.data)
        if args.out is None:
            return score(conversations, None)
        checkpoint = checkpoint_of(args)
        inputs = [args.data, checkpoint, run_dir_of(checkpoint)]
        with claim(args.out, SCORED, force=args.force, command=PROG, inputs=inputs) as destination:
            return score(conversations, destination)

    def score(conversations: list, destination: Any) -> int:
        from smallm.data.conversations import json_lines
        from smallm.inference.scoring import score_conversations
        from smallm.model.reward import RewardModel

        model, tokenizer = load(args)
        if not isinstance(model, RewardModel):
            raise ValueError(f"{args.checkpoint} is a language model, not a reward model: train one with smallm-rm")
        scores = score_conversations(model, tokenizer, conversations, args.batch_size)
        records = [record for _, record in json_lines(args.data)]
        lines = "".join(json.dumps({**r, "score": s}, ensure_ascii=False) + "\n" for r, s in zip(records, scores))
        if destination is None:
            sys.stdout.write(lines)
        else:
            destination.write_file(lambda path: path.write_text(lines, encoding="utf-8"))
        print(f"{PROG}: {len(scores)} conversations, mean score {sum(scores) / len(scores):.4f}", file=sys.stderr)
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
