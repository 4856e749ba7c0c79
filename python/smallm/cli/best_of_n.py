"""``smallm-best-of-n``: rejection sampling. N replies per prompt from a policy, scored, the best kept.

    smallm-best-of-n runs/sft --reward runs/rm --prompts prompts.jsonl --n 8 --out best.jsonl
    smallm-best-of-n runs/sft --reward runs/rm --prompts prompts.jsonl --n 8 --out best.jsonl --pairs pairs.jsonl
    smallm-best-of-n runs/sft --reward-fn checks:exact --prompts sums.jsonl --n 8 --out best.jsonl  # a verifier

``--out`` gets one SFT conversation per prompt (the best reply, its score and the prompt's mean score),
``--pairs`` best-vs-worst as DPO pairs: ``smallm-sft --data best.jsonl``, ``smallm-dpo --data pairs.jsonl``.
``--min-score`` keeps only the prompts whose best reply scores at least that (with a verifier scoring 1
for right, ``--min-score 1`` keeps right answers only); the others go to ``OUT.below.jsonl``. A run that
stops is resumed by running it again: prompts already done are skipped (``--force`` starts over).
Sampling: ``smallm-generate``'s settings (default temperature 1.0, top-k 50); ``--seed`` makes it
deterministic. ``--reward-fn module:function`` scores with ``function(record, reply) -> float``, given
the prompt file's whole line (an ``answer`` field, a test to run...). See :mod:`smallm.inference.rejection`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from smallm.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    checkpoint_of,
    load,
    run_command,
    sampling_from,
)

PROG = "smallm-best-of-n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Rejection sampling: keep the best of N replies per prompt.")
    add_model_arguments(p)
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--reward", help="a reward model run from smallm-rm (or its Hub id)")
    scorer.add_argument("--reward-fn", help="module:function scoring (record, reply) -> float instead")
    p.add_argument("--prompts", required=True, type=Path, help='JSON Lines: {"prompt": str or messages, ...}')
    p.add_argument("--n", type=int, default=8, help="replies sampled per prompt (default: 8)")
    p.add_argument("--out", required=True, type=Path, help="the best replies, as SFT conversations (appended)")
    p.add_argument("--pairs", type=Path, help="also best-vs-worst as DPO pairs here (appended)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply (default: 128)")
    p.add_argument(
        "--min-score", type=float,
        help="keep nothing of a prompt whose best reply scores below this (it goes to OUT.below.jsonl); with a "
        "verifier scoring 1 for right, --min-score 1 keeps right answers only",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", help="start --out and --pairs over instead of resuming")
    add_sampling_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from smallm.inference.rejection import load_score_function, read_prompts, run_best_of_n
        from smallm.model.reward import RewardModel
        from smallm.run.load import run_dir_of

        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be positive")
        read_prompts(args.prompts)  # a malformed file fails before any model is loaded
        reward_args = argparse.Namespace(**{**vars(args), "checkpoint": args.reward, "revision": None})
        models = [checkpoint_of(args), *([checkpoint_of(reward_args)] if args.reward else [])]
        score_function = load_score_function(args.reward_fn) if args.reward_fn else None
        policy, tokenizer = load(args)
        reward_model = None
        if args.reward:
            reward_model, reward_tokenizer = load(reward_args)
            if not isinstance(reward_model, RewardModel):
                raise ValueError(f"--reward {args.reward} is a language model, not a reward model (smallm-rm)")
            if reward_tokenizer.to_json() != tokenizer.to_json():
                raise ValueError(f"--reward {args.reward} has another tokenizer than the policy {args.checkpoint}")
        result = run_best_of_n(
            policy, tokenizer, args.prompts, args.out, args.n, reward_model=reward_model,
            score_function=score_function, pairs_out=args.pairs, sampling=sampling_from(args, temperature=1.0),
            max_new_tokens=args.max_new_tokens, seed=args.seed or 0, min_score=args.min_score, force=args.force,
            inputs=[*models, *map(run_dir_of, models)], log=lambda m: print(f"{PROG}: {m}", file=sys.stderr),
        )  # fmt: skip
        print(f"{PROG}: {result['prompts']} prompts, best of {args.n}: mean best score {result['mean_best']:.4f}, "
              f"mean score {result['mean_score']:.4f}; {result['kept']} kept -> {args.out}",
              file=sys.stderr)  # fmt: skip
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
