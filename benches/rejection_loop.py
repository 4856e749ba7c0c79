"""Rejection sampling measured: SFT, a reward model, best-of-N + SFT and best-of-N + DPO on a task whose
answers can be checked (the sum of two digits), on CPU.

From a pretrained base (default: the README demo's ``runs/stdlib-tiny``), with the conversations
"What is 7 plus 8?" -> "7 plus 8 is 15.", the 100 sums split into 40 answered ones for SFT, a pool of 30
prompts whose answers only the checker knows (rejection sampling's new prompts), and 30 held out:

1. **SFT** on the ``--train`` conversations for ``--sft-steps`` steps;
2. **reward model** (``smallm-rm``'s task) from the SFT model, on pairs labelled by correctness: N replies
   sampled from the SFT model for each pool prompt, up to 4 distinct correct ones against incorrect ones;
   its accuracy is measured on such pairs of the held-out prompts;
3. **best-of-N + SFT**: N replies per pool prompt from the SFT model, the reward model's best kept
   (``smallm-best-of-n``), and SFT continued on them together with the 40 answered conversations; then a
   second round from that model;
4. **best-of-N + DPO**: the reward model's best against its worst, as DPO pairs from the SFT model.

Each model is scored by greedy exact match on the held-out prompts (the number after "is" equals the
sum). Reported: exact match per step, the reward model's held-out accuracy, and the cost (replies
sampled, minutes). ``--verifier`` also runs best-of-N with the exact checker as the score.

    python benches/rejection_loop.py --base runs/stdlib-tiny
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _machine import cpu_model, usable_cores
from smallm.chat import prompt_ids
from smallm.config import DPOConfig, FinetuneConfig, RewardConfig
from smallm.generate import SamplingConfig, generate_batch, stop_ids_of
from smallm.jobs import build_trainer
from smallm.rejection import run_best_of_n
from smallm.reward import score_conversations
from smallm.runs import load_model

REPO = Path(__file__).resolve().parents[1]
ANSWER = re.compile(r"is (-?\d+)")


def split_problems(train: int, pool: int, seed: int) -> tuple[list[tuple[int, int]], ...]:
    """The 100 sums of two digits, shuffled: ``train`` with their answers for SFT, ``pool`` prompts without
    answers for the reward model's pairs and best-of-N, and the rest held out."""
    every = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(every)
    return every[:train], every[train : train + pool], every[train + pool :]


def question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def correct(record: dict[str, Any], reply: str) -> float:
    """The verifier: 1 when the number after "is" is the sum, else 0."""
    found = ANSWER.search(reply)
    return 1.0 if found and int(found.group(1)) == record["a"] + record["b"] else 0.0


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def exact_match(run: Path, tests: list[tuple[int, int]]) -> float:
    model, tok, _ = load_model(run)
    stops = stop_ids_of(tok)
    prompts = [prompt_ids(tok, [{"role": "user", "content": question(a, b)}]) for a, b in tests]
    hits = 0
    for start in range(0, len(prompts), 32):
        replies = generate_batch(model, prompts[start : start + 32], 16, sampling=SamplingConfig(temperature=0),
                                 stop_ids=stops, vocab_size=tok.vocab_size)  # fmt: skip
        for (a, b), ids in zip(tests[start : start + 32], replies):
            hits += correct({"a": a, "b": b}, tok.decode(ids)) == 1.0
    return hits / len(tests)


def common(args: argparse.Namespace, base: Path, data: Path, out: Path, steps: int, lr: float) -> dict[str, Any]:
    return dict(init_from=str(base), data=str(data), out=str(out), max_steps=steps, batch_size=16, lr=lr,
                warmup_steps=5, log_every=10, eval_every=steps, checkpoint_every=steps, device="cpu", seed=args.seed,
                sample_tokens=8, val_fraction=0.1)  # fmt: skip


def labelled_pairs(run: Path, train: list[tuple[int, int]], n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """For each training prompt, N sampled replies; a correct one against an incorrect one where both occur."""
    model, tok, _ = load_model(run)
    stops, pairs, samples = stop_ids_of(tok), [], 0
    for i, (a, b) in enumerate(train):
        ids = prompt_ids(tok, [{"role": "user", "content": question(a, b)}])
        sampled = generate_batch(model, [ids] * n, 16, sampling=SamplingConfig(temperature=1.0), stop_ids=stops,
                                 seed=seed * 7919 + i, vocab_size=tok.vocab_size)  # fmt: skip
        replies = [tok.decode(r) for r in sampled]
        samples += n
        good = list(dict.fromkeys(r for r in replies if correct({"a": a, "b": b}, r)))
        bad = list(dict.fromkeys(r for r in replies if not correct({"a": a, "b": b}, r)))
        for chosen, rejected in list(zip(good, bad))[:4]:  # up to 4 distinct pairs per prompt
            pairs.append({"prompt": question(a, b), "chosen": chosen, "rejected": rejected})
    return pairs, samples


def pair_accuracy(rm: Path, pairs: list[dict[str, Any]]) -> float | None:
    """How often the reward model scores the correct reply of a pair above the incorrect one."""
    if not pairs:
        return None
    model, tok, _ = load_model(rm)
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}]
                     for p in pairs for side in ("chosen", "rejected")]  # fmt: skip
    scores = score_conversations(model, tok, conversations)
    return sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))) / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=REPO / "runs" / "stdlib-tiny")
    p.add_argument("--train", type=int, default=40, help="answered sums for SFT, of the 100 (default: 40)")
    p.add_argument("--pool", type=int, default=30, help="prompts for the reward model and best-of-N (default: 30)")
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--n", type=int, default=8, help="replies per prompt (default: 8)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of best-of-N + SFT (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verifier", action="store_true", help="also best-of-N scored by the exact checker")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(usable_cores())
    train, pool, tests = split_problems(args.train, args.pool, args.seed)
    rows: list[dict[str, Any]] = []

    def report(step: str, run: Path, started: float, samples: int = 0, **extra: Any) -> None:
        rows.append({"step": step, "exact_match": exact_match(run, tests), "samples": samples,
                     "minutes": (time.perf_counter() - started) / 60, **extra})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        chats = write_jsonl(work / "chats.jsonl", [
            {"messages": [{"role": "user", "content": question(a, b)},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]} for a, b in train
        ])  # fmt: skip
        prompts = write_jsonl(work / "prompts.jsonl", [{"prompt": question(a, b), "a": a, "b": b} for a, b in pool])
        started = time.perf_counter()
        report("base (no fine-tuning)", args.base, started)

        started = time.perf_counter()
        sft = work / "sft"
        build_trainer(FinetuneConfig(**common(args, args.base, chats, sft, args.sft_steps, 3e-3))).fit()
        report("SFT", sft, started)

        started = time.perf_counter()
        pairs, samples = labelled_pairs(sft, pool, args.n, args.seed)
        write_jsonl(work / "labelled.jsonl", pairs)
        rm = work / "rm"
        build_trainer(RewardConfig(**common(args, sft, work / "labelled.jsonl", rm, 150, 1e-3))).fit()
        held_out_pairs, _ = labelled_pairs(sft, tests, args.n, args.seed + 1)  # measures the RM only
        minutes = (time.perf_counter() - started) / 60
        rows.append({"step": f"reward model ({len(pairs)} labelled pairs)", "exact_match": None, "samples": samples,
                     "minutes": minutes, "val_accuracy": pair_accuracy(rm, held_out_pairs),
                     "held_out_pairs": len(held_out_pairs)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        reward, _, _ = load_model(rm)

        policy = sft
        for round_ in range(1, args.rounds + 1):
            started = time.perf_counter()
            model, tok, _ = load_model(policy)
            best = work / f"best{round_}.jsonl"
            stats = run_best_of_n(
                model, tok, prompts, best, args.n, reward_model=reward, pairs_out=work / f"pairs{round_}.jsonl",
                sampling=SamplingConfig(temperature=1.0), max_new_tokens=16, seed=args.seed + round_,
            )  # fmt: skip
            chosen = [json.loads(line) for line in best.read_text().splitlines()]
            records = [json.loads(line) for line in prompts.read_text().splitlines()]
            right = sum(correct(records[c["index"]], c["messages"][-1]["content"]) for c in chosen) / len(chosen)
            nxt = work / f"bon-sft{round_}"
            mixed = work / f"sft-data{round_}.jsonl"  # the kept replies beside the answered conversations
            mixed.write_text(chats.read_text() + best.read_text(), encoding="utf-8")
            build_trainer(FinetuneConfig(**common(args, policy, mixed, nxt, args.sft_steps, 1e-3))).fit()
            report(f"best-of-{args.n} + SFT, round {round_}", nxt, started, samples=args.n * len(pool),
                   chosen_correct=right, mean_best_reward=stats["mean_best"])  # fmt: skip
            if round_ == 1:
                started = time.perf_counter()
                dpo = work / "bon-dpo"
                build_trainer(DPOConfig(**common(args, sft, work / "pairs1.jsonl", dpo, args.sft_steps, 1e-4))).fit()
                report(f"best-of-{args.n} + DPO (pairs of round 1)", dpo, started)
            policy = nxt
        if args.verifier:
            started = time.perf_counter()
            model, tok, _ = load_model(sft)
            best = work / "verified.jsonl"
            run_best_of_n(model, tok, prompts, best, args.n, score_function=correct,
                          sampling=SamplingConfig(temperature=1.0), max_new_tokens=16, seed=args.seed + 99)  # fmt: skip
            nxt = work / "verified-sft"
            mixed = work / "sft-data-verified.jsonl"
            mixed.write_text(chats.read_text() + best.read_text(), encoding="utf-8")
            build_trainer(FinetuneConfig(**common(args, sft, mixed, nxt, args.sft_steps, 1e-3))).fit()
            report(f"best-of-{args.n} (exact checker) + SFT", nxt, started, samples=args.n * len(pool))

    print(f"machine: {cpu_model()}, {usable_cores()} cores, torch {torch.__version__}; base {args.base}")
    print(f"{len(train)} answered sums for SFT, {len(pool)} prompts for rejection sampling, {len(tests)} held out; "
          "greedy exact match\n")  # fmt: skip
    print("| step | held-out exact match | replies sampled | minutes | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.1%}"
        notes = []
        if r.get("val_accuracy") is not None:
            notes.append(f"accuracy {r['val_accuracy']:.1%} on {r['held_out_pairs']} pairs of held-out prompts")
        if "chosen_correct" in r:
            notes.append(f"kept replies correct {r['chosen_correct']:.1%}")
        print(f"| {r['step']} | {em} | {r['samples']:,} | {r['minutes']:.1f} | {'; '.join(notes)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
