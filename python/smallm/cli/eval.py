"""``smallm-eval``: loss, perplexity and bits per byte of a trained model on shards or raw text.

    smallm-eval runs/tiny --data data/                    # the shard directory's val split
    smallm-eval runs/mix --data ko/ en/ code/             # per source, and over all
    smallm-eval runs/tiny --data data/ --split train --max-batches 50
    smallm-eval runs/tiny --data notes.txt book.md --json # raw text, tokenized with the model's tokenizer
    smallm-eval runs/tiny --data texts/ --seq-len 256     # every .txt .text .md .rst .py file below texts/

    smallm-eval runs/tiny --tasks arc_easy,hellaswag --limit 200   # lm-evaluation-harness tasks
    smallm-eval runs/ko --tasks nsmc_file --include-path my_tasks/ --data data/ko

``--data`` is either shard directories from ``smallm-tokenize`` (each has a ``manifest.json``; their shards
must come from the model's tokenizer) or text files and directories of them. Several shard directories
(a mixture's sources) are evaluated one by one and reported as a table, one row per source and one over
all of them. How the tokens are cut into
windows and what bits per byte means: :mod:`smallm.inference.evaluate`.

``--tasks`` runs lm-evaluation-harness tasks on the model itself (:mod:`smallm.inference.harness`; lm-eval's
tasks, smallm's Korean ones, and those of ``--include-path`` folders), prints lm-eval's table with the
CORE-like centered accuracy, and writes the results to ``RUN/evals/CHECKPOINT.json`` (a run's checkpoint;
merged with the tasks evaluated there before).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smallm.cli.common import add_model_arguments, load, run_command
from smallm.data.shards import MANIFEST

PROG = "smallm-eval"
TEXT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py")
"""Files taken from a directory of raw text."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Evaluate a smallm model: loss, perplexity, bits per byte.")
    add_model_arguments(p)
    p.add_argument("--data", nargs="+", metavar="DIR_OR_FILES",
                   help="a shard directory, or text files and directories of them")  # fmt: skip
    g = p.add_argument_group('lm-evaluation-harness tasks (pip install "smallm[eval]")')
    g.add_argument("--tasks", help="lm-eval task or group names, comma-separated (lm_eval ls tasks lists them)")
    g.add_argument("--include-path", action="append", default=[], help="a folder of task YAML files (repeatable)")
    g.add_argument("--limit", type=float, help="items per task (below 1: a share of them)")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    g.add_argument("--apply-chat-template", action="store_true", help="render prompts with the run's chat template")
    p.add_argument("--split", choices=("train", "val"), default="val", help="split of a shard directory (default: val)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default: 8)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the model's context)")
    p.add_argument("--max-batches", type=int, help="stop after this many batches (default: all)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="autocast dtype; auto: bf16 (or fp16) on CUDA, fp32 elsewhere")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def batches_for(args: argparse.Namespace, tokenizer: Any, seq_len: int, device: Any) -> tuple[Any, str]:
    """The batches of ``--data`` and a description of them."""
    from smallm.data.loader import ValidationLoader
    from smallm.data.shardset import ShardSet
    from smallm.inference.evaluate import text_tokens
    from smallm.text.corpus import find_corpus_files
    from smallm.text.tokenizer import Tokenizer

    data = [Path(d) for d in args.data]
    if len(data) == 1 and (data[0] / MANIFEST).is_file():
        shards = ShardSet.open(data[0], args.split)
        if Tokenizer.load(data[0]).to_json() != tokenizer.to_json():
            raise ValueError(f"{data[0]}: its shards were made with another tokenizer than the model's")
        if shards.num_tokens < 2:
            raise ValueError(f"{data[0]}: the {args.split} split has no tokens to evaluate (try --split train)")
        loader = ValidationLoader(shards, args.batch_size, seq_len, rank=0, world_size=1, device=device)
        return loader, f"{data[0]} ({args.split}: {len(shards.shards)} shard(s), {shards.num_tokens:,} tokens)"
    files = find_corpus_files(data, extensions=TEXT_EXTENSIONS)
    tokens = text_tokens(tokenizer, files)
    if len(tokens) < 2:
        raise ValueError("the text files hold nothing to evaluate")
    windows = ValidationLoader(
        tokens, args.batch_size, seq_len, pad_id=tokenizer.bos_id, rank=0, world_size=1, device=device
    )
    return windows, f"{len(files)} text file(s), {len(tokens):,} tokens"


def evaluate(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise ValueError("--batch-size and --max-batches must be positive")
    model, tokenizer = load(args)
    context = model.config.max_seq_len
    if not 0 < (args.seq_len or context) <= context:
        raise ValueError(f"--seq-len must be in 1..{context}, the model's context")
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint)}
    if args.data:
        report.update(bits_per_byte(args, model, tokenizer, args.seq_len or context))
    if args.tasks:
        report.update(run_tasks(args, model, tokenizer))
    if args.json:
        print(json.dumps(report))
    return 0


def bits_per_byte(args: argparse.Namespace, model: Any, tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """Loss, perplexity and bits per byte on ``--data`` (printed unless ``--json``)."""
    from itertools import islice

    from smallm.data.sources import has_weight
    from smallm.inference.evaluate import byte_length_table, evaluate_batches
    from smallm.train.distributed import autocast_dtype

    device = model.lm_head.weight.device
    # A mixture's sources as smallm-train takes them (DIR:WEIGHT) are its directories here.
    plain = [d.rpartition(":")[0] if has_weight(d) and not Path(d).exists() else d for d in args.data]
    shard_dirs = [Path(d) for d in plain if (Path(d) / MANIFEST).is_file()]
    if len(args.data) > 1 and len(shard_dirs) == len(args.data):
        return evaluate_sources(args, model, tokenizer, seq_len, shard_dirs)
    args.data = plain
    batches, described = batches_for(args, tokenizer, seq_len, device)
    total = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
    byte_lengths = byte_length_table(tokenizer, model.config.vocab_size, device)
    amp = autocast_dtype(args.precision, device)
    progress = not args.no_progress
    result = evaluate_batches(model, islice(batches, total), byte_lengths, amp, progress=progress, total=total)
    if not args.json:
        print(f"checkpoint     {args.checkpoint}")
        print(f"data           {described}")
        print(f"targets        {result['tokens']:,} tokens, {result['bytes']:,} bytes ({total} batches of {seq_len})")
        print(f"loss           {result['loss']:.4f} nats/token")
        print(f"perplexity     {result['perplexity']:.3f}")
        print(f"bits per byte  {result['bits_per_byte']:.4f}")
    return {"data": described, "seq_len": seq_len, "batches": total, **result}


def evaluate_sources(
    args: argparse.Namespace, model: Any, tokenizer: Any, seq_len: int, dirs: list[Path]
) -> dict[str, Any]:
    """Each shard directory's split on its own, then the sums over all of them: a row each."""
    from itertools import islice

    from smallm.inference.evaluate import byte_length_table, loss_sums, metrics_from_sums
    from smallm.train.distributed import autocast_dtype
    from smallm.train.tasks.lm import check_one_tokenizer, source_names

    check_one_tokenizer([str(d) for d in dirs])
    device = model.lm_head.weight.device
    byte_lengths = byte_length_table(tokenizer, model.config.vocab_size, device)
    amp = autocast_dtype(args.precision, device)
    rows, total = {}, None
    for name, directory in zip(source_names([str(d) for d in dirs]), dirs):
        batches, _ = batches_for(argparse.Namespace(**{**vars(args), "data": [str(directory)]}), tokenizer, seq_len,
                                 device)  # fmt: skip
        n = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
        sums = loss_sums(model, islice(batches, n), byte_lengths, amp, progress=not args.no_progress, total=n)
        rows[name] = metrics_from_sums(sums)
        total = sums if total is None else total + sums
    rows["all"] = metrics_from_sums(total)
    if not args.json:
        print(f"checkpoint {args.checkpoint}, {args.split} split, windows of {seq_len}\n")
        print("| source | tokens | loss | perplexity | bits per byte |")
        print("|---|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['tokens']:,} | {r['loss']:.4f} | {r['perplexity']:.3f} | {r['bits_per_byte']:.4f} |")
    return {"split": args.split, "seq_len": seq_len, "sources": rows}


def run_tasks(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """The ``--tasks`` results, printed (or folded into ``--json``) and written next to the run."""
    from smallm.inference.harness import SmallmLM, evaluate_tasks
    from smallm.train.distributed import autocast_dtype
    from smallm.train.task_eval import task_names

    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    amp = autocast_dtype(args.precision, model.lm_head.weight.device)
    lm = SmallmLM(model, tokenizer, batch_size=args.batch_size, max_length=args.seq_len, amp_dtype=amp,
                  name=str(args.checkpoint))  # fmt: skip
    results = evaluate_tasks(
        lm, task_names(args.tasks), include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template,
    )  # fmt: skip
    saved = save_results(args, results)
    if not args.json:
        from lm_eval.utils import make_table

        print(make_table(results))
        core = results["summary"].get("task/core")
        if core is not None:
            print(f"CORE (accuracy centered on chance, averaged over the multiple-choice tasks): {core:.4f}")
        if saved is not None:
            print(f"results written to {saved}")
    return {"tasks": results["results"], "summary": results["summary"], **({"written": str(saved)} if saved else {})}


def save_results(args: argparse.Namespace, results: dict[str, Any]) -> Path | None:
    """Writes the results (without the per-item samples) to ``RUN/evals/CHECKPOINT.json``, merged with what
    is there; None for a checkpoint outside a run (a Hub model's cache)."""
    from smallm.cli.common import checkpoint_of
    from smallm.files.atomic import write_json_atomic
    from smallm.run.layout import CHECKPOINTS_DIR, EVALS_DIR, read_json

    checkpoint = checkpoint_of(args)
    if checkpoint.parent.name != CHECKPOINTS_DIR:
        return None
    path = checkpoint.parent.parent / EVALS_DIR / f"{checkpoint.name}.json"
    kept = read_json(path) or {}
    record = {key: results.get(key) for key in ("results", "versions", "n-shot", "n-samples", "configs")}
    for key, value in record.items():
        if isinstance(value, dict):
            kept.setdefault(key, {}).update(value)
    kept["summary"] = {**kept.get("summary", {}), **results["summary"]}
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, json.loads(json.dumps(kept, default=str)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.data and not args.tasks:
        build_parser().error("give --data (bits per byte), --tasks (lm-eval tasks), or both")
    return run_command(PROG, lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
