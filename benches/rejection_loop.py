"""Rejection sampling measured: SFT, a reward model, best-of-N + SFT and best-of-N + DPO on a task whose
answers can be checked (the sum of two digits), on CPU.

The base (default: the README demo's ``runs/stdlib-tiny``, a 7M model of Python code) first continues
pretraining for ``--pretrain-steps`` on Python lines ``assert 7 + 8 == 15`` of all 100 sums, so that it
knows the sums as code, as a pretrained model knows facts, but has never seen the question. Then, with
the conversations "What is 7 plus 8?" -> "7 plus 8 is 15.", the 100 sums split into ``--train`` answered
ones for SFT, a pool of ``--pool`` prompts whose answers only the checker knows (rejection sampling's
new prompts), and the rest held out:

1. **SFT** on the answered conversations for ``--sft-steps`` steps;
2. **reward model** (``smallm-rm``'s task) from the SFT model, on pairs labelled by correctness: N replies
   sampled from the SFT model for each prompt of the answered set and the pool, each distinct correct one
   against each distinct incorrect one (up to 4 pairs per prompt); its accuracy is measured on such
   pairs of the held-out prompts;
3. **best-of-N + SFT**: N replies per pool prompt, the reward model's best kept (``smallm-best-of-n``),
   and SFT continued on them together with the answered conversations; ``--rounds`` rounds, each from
   the model of the one before;
4. **best-of-N + DPO**: the reward model's best against its worst (round 1's pairs), from the SFT model;
5. **best-of-N with the exact checker + SFT** (``--min-score 1``: only right replies are kept), rounds too;
6. the **control**: one sampled reply per pool prompt, kept whatever it says (SFT on the policy's own
   samples, without selection), and the **ceiling**: SFT continued on the pool with its true answers
   (what a perfect selection could give).

Each model is scored by greedy exact match on the held-out prompts (the number after "is" equals the
sum). Reported: exact match per step, the reward model's held-out accuracy, the share of kept replies
that are right, and the cost (replies sampled, minutes).

    python benches/rejection_loop.py --base runs/stdlib-tiny
"""

from __future__ import annotations

import argparse
import itertools
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
from smallm.data.shards import PackOptions, pack_corpus
from smallm.inference.generate import SamplingConfig, generate_batch, stop_ids_of
from smallm.inference.rejection import run_best_of_n
from smallm.inference.scoring import score_conversations
from smallm.run.load import load_model
from smallm.text.chat import prompt_ids
from smallm.text.corpus import Corpus
from smallm.text.tokenizer import Tokenizer
from smallm.train.config import DPOConfig, FinetuneConfig, RewardConfig, TrainConfig
from smallm.train.jobs import build_trainer

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


def answered(a: int, b: int) -> dict[str, Any]:
    """The SFT conversation of one sum."""
    return {"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}  # fmt: skip


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
    """Fine-tuning settings: the conversations are about 15 tokens, so rows of 64 hold several."""
    return dict(init_from=str(base), data=str(data), out=str(out), max_steps=steps, batch_size=16, seq_len=64,
                lr=lr, warmup_steps=5, log_every=10, eval_every=steps, checkpoint_every=steps, device="cpu",
                seed=args.seed, sample_tokens=8, val_fraction=0.1)  # fmt: skip


def sums_as_code(base: Path, work: Path, steps: int, seed: int) -> Path:
    """``base`` continued on Python ``assert a + b == a+b`` lines of all 100 sums (40 shuffled copies, one
    document each), with its own tokenizer: a model that knows the sums in code but not as questions."""
    rng = random.Random(seed)
    documents = []
    for _ in range(40):
        every = [(a, b) for a in range(10) for b in range(10)]
        rng.shuffle(every)
        documents.append("\n".join(f"assert {a} + {b} == {a + b}" for a, b in every))
    text = work / "sums.py.txt"
    text.write_text("\n\n".join(documents), encoding="utf-8")
    shards = work / "sums-shards"
    shards.mkdir()
    tokenizer = Tokenizer.load(base)
    tokenizer.save(shards)
    pack_corpus(Corpus(files=[text], doc_mode="paragraph"), tokenizer, shards, PackOptions(val_fraction=0.05),
                progress=False)  # fmt: skip
    out = work / "base-sums"
    build_trainer(TrainConfig(init_from=str(base), data=str(shards), out=str(out), max_steps=steps, batch_size=8,
                              seq_len=128, batch_tokens=1024, warmup_steps=10, log_every=25, eval_every=steps,
                              checkpoint_every=steps, device="cpu", seed=seed, sample_prompt="assert 3 + 4 ==",
                              sample_tokens=4)).fit()  # fmt: skip
    return out


def labelled_pairs(run: Path, train: list[tuple[int, int]], n: int, seed: int) -> tuple[list[dict[str, Any]], int]:
    """For each prompt, N sampled replies labelled by the checker: each distinct correct reply against each
    distinct incorrect one, up to 4 pairs per prompt (right replies of a sum are few and alike)."""
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
        for chosen, rejected in list(itertools.product(good, bad))[:4]:
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
    p.add_argument("--pretrain-steps", type=int, default=150,
                   help="steps on the sums as Python code before SFT (0: the base as it is)")  # fmt: skip
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--n", type=int, default=8, help="replies per prompt (default: 8)")
    p.add_argument("--label-n", type=int, default=32, help="replies sampled per prompt for the reward model's pairs")
    p.add_argument("--rm-steps", type=int, default=200, help="reward model training steps (default: 200)")
    p.add_argument("--rm-lr", type=float, default=3e-4, help="reward model learning rate (default: 3e-4)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of best-of-N + SFT (default: 2)")
    p.add_argument("--seed", type=int, default=0)
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
        chats = write_jsonl(work / "chats.jsonl", [answered(a, b) for a, b in train])
        records = [{"prompt": question(a, b), "a": a, "b": b} for a, b in pool]
        prompts = write_jsonl(work / "prompts.jsonl", records)
        started = time.perf_counter()
        base = args.base
        if args.pretrain_steps:
            base = sums_as_code(args.base, work, args.pretrain_steps, args.seed)
            report(f"base + {args.pretrain_steps} steps on the sums as code (no fine-tuning)", base, started)

        started = time.perf_counter()
        sft = work / "sft"
        build_trainer(FinetuneConfig(**common(args, base, chats, sft, args.sft_steps, 1e-3))).fit()
        report("SFT", sft, started)

        started = time.perf_counter()
        pairs, samples = labelled_pairs(sft, train + pool, args.label_n, args.seed)  # the checker labels any prompt
        write_jsonl(work / "labelled.jsonl", pairs)
        rm = work / "rm"
        build_trainer(RewardConfig(**common(args, sft, work / "labelled.jsonl", rm, args.rm_steps, args.rm_lr))).fit()
        held_out_pairs, _ = labelled_pairs(sft, tests, args.label_n, args.seed + 1)  # measures the RM only
        minutes = (time.perf_counter() - started) / 60
        rows.append({"step": f"reward model ({len(pairs)} labelled pairs)", "exact_match": None, "samples": samples,
                     "minutes": minutes, "val_accuracy": pair_accuracy(rm, held_out_pairs),
                     "held_out_pairs": len(held_out_pairs)})  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        reward, _, _ = load_model(rm)

        def rounds(name: str, **scoring: Any) -> None:
            """``--rounds`` of best-of-N + SFT from the SFT model, each continuing the one before on the answered
            conversations and the replies kept (the reward model's pairs of round 1 also train DPO)."""
            policy = sft
            for round_ in range(1, args.rounds + 1):
                started = time.perf_counter()
                model, tok, _ = load_model(policy)
                best = work / f"{name}-best{round_}.jsonl"
                pairs_out = work / f"{name}-pairs{round_}.jsonl"
                run_best_of_n(model, tok, prompts, best, args.n, pairs_out=pairs_out, max_new_tokens=16,
                              sampling=SamplingConfig(temperature=1.0), seed=args.seed + round_, **scoring)  # fmt: skip
                chosen = [json.loads(line) for line in best.read_text().splitlines()]
                right = int(sum(correct(records[c["index"]], c["messages"][-1]["content"]) for c in chosen))
                nxt = work / f"{name}-sft{round_}"
                mixed = work / f"{name}-data{round_}.jsonl"
                mixed.write_text(chats.read_text() + best.read_text(), encoding="utf-8")
                build_trainer(FinetuneConfig(**common(args, policy, mixed, nxt, args.sft_steps, 1e-3))).fit()
                label = "reward model" if "reward_model" in scoring else "exact checker, --min-score 1"
                report(f"best-of-{args.n} ({label}) + SFT, round {round_}", nxt, started,
                       samples=args.n * len(pool), kept=len(chosen), kept_correct=right)  # fmt: skip
                if round_ == 1 and "reward_model" in scoring:
                    started = time.perf_counter()
                    dpo = work / f"{name}-dpo"
                    build_trainer(DPOConfig(**common(args, sft, pairs_out, dpo, args.sft_steps, 1e-4))).fit()
                    report(f"best-of-{args.n} (reward model) + DPO, best vs worst of round 1", dpo, started)
                policy = nxt

        started = time.perf_counter()  # the control: one sampled reply per pool prompt, no selection at all
        model, tok, _ = load_model(sft)
        sampled = [tok.decode(generate_batch(model, [prompt_ids(tok, [{"role": "user", "content": r["prompt"]}])],
                                             16, sampling=SamplingConfig(temperature=1.0), stop_ids=stop_ids_of(tok),
                                             seed=args.seed * 7919 + 1_000 + i, vocab_size=tok.vocab_size)[0])
                   for i, r in enumerate(records)]  # fmt: skip
        unselected = work / "unselected.jsonl"
        replies = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": reply}]}
                   for r, reply in zip(records, sampled)]  # fmt: skip
        unselected.write_text(chats.read_text() + "".join(json.dumps(r) + "\n" for r in replies))
        build_trainer(FinetuneConfig(**common(args, sft, unselected, work / "unselected", args.sft_steps, 1e-3))).fit()
        report("control: one sampled reply per prompt, no selection, + SFT", work / "unselected", started,
               samples=len(pool), kept=len(pool), kept_correct=int(sum(map(correct, records, sampled))))  # fmt: skip

        rounds("rm", reward_model=reward)
        rounds("checker", score_function=correct, min_score=1.0)

        started = time.perf_counter()  # the ceiling: every pool prompt with its true answer
        truth = work / "ceiling.jsonl"
        truth.write_text(chats.read_text() + "".join(json.dumps(answered(a, b)) + "\n" for a, b in pool))
        build_trainer(FinetuneConfig(**common(args, sft, truth, work / "ceiling", args.sft_steps, 1e-3))).fit()
        report("ceiling: SFT continued with the pool's true answers", work / "ceiling", started)

    print(f"machine: {cpu_model()}, {usable_cores()} cores, torch {torch.__version__}; base {args.base}, "
          f"{args.pretrain_steps} steps on the sums as code")  # fmt: skip
    print(f"{len(train)} answered sums for SFT, {len(pool)} prompts for rejection sampling, {len(tests)} held out; "
          "greedy exact match\n")  # fmt: skip
    print("| step | held-out exact match | replies sampled | minutes | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        em = "-" if r["exact_match"] is None else f"{r['exact_match']:.1%}"
        notes = []
        if r.get("val_accuracy") is not None:
            notes.append(f"accuracy {r['val_accuracy']:.1%} on {r['held_out_pairs']} pairs of held-out prompts")
        if "kept" in r:
            notes.append(f"{r['kept']} replies kept, {r['kept_correct']} of them right")
        print(f"| {r['step']} | {em} | {r['samples']:,} | {r['minutes']:.1f} | {'; '.join(notes)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
