"""``smallm-tokenize``: the whole data step. Finds the corpus, trains a byte-level BPE tokenizer (or
reuses one), and packs every document into token shards for training.

    smallm-tokenize CORPUS... --vocab 32000 --out DIR
    smallm-tokenize CORPUS... --tokenizer TOKDIR --out DIR        # reuse a tokenizer
    smallm-tokenize CORPUS... --tokenizer RUN --extend 3000 --out DIR   # add 3000 tokens learned on CORPUS
    smallm-tokenize CORPUS... --tokenizer TOKDIR --out DIR --no-shards --report   # how well it fits CORPUS
    smallm-tokenize --hf-dataset json --hf-data-files a.jsonl --out DIR
    smallm-tokenize @stdlib --vocab 8000 --out DIR                 # the Python standard library
    smallm-tokenize CORPUS... --out DIR --dedup near --quality gopher   # filters, then no copies
    smallm-tokenize CORPUS... --dedup near --dry-run-filters       # what would be removed; writes nothing

DIR receives ``tokenizer.json``, ``tokenizer.tiktoken`` (and, for a tokenizer trained elsewhere, the roles
of its special tokens as ``tokenizer_config.json``: :mod:`smallm.text.roles`), the shards
``train_*.bin``/``val_*.bin`` with their ``.idx`` document indexes, and ``manifest.json``
(:data:`smallm.data.shards.TOKENIZED`, claimed by the rule of :mod:`smallm.files.destination`: ``--force``
replaces only an earlier ``smallm-tokenize``'s output). An interrupted run resumes when run again; a
``--tokenizer`` that is ``--out`` itself is packed with in place. The cleaning flags (filters, ``--dedup``)
are :mod:`smallm.data.cleaning`'s; their report is printed and recorded in ``manifest.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smallm.cli.common import run_command
from smallm.data.cleaning import CleanSettings, report_table
from smallm.data.shards import JOURNAL, TOKENIZED, PackOptions, judge_corpus, pack_corpus
from smallm.files.atomic import copy_file_atomic, write_json_atomic, write_text_atomic
from smallm.files.destination import claim
from smallm.text.corpus import DEFAULT_EXTENSIONS, STDLIB_CORPUS, Corpus, CorpusError, find_corpus_files
from smallm.text.extension import extend_tokenizer
from smallm.text.report import tokenizer_report
from smallm.text.roles import TOKENIZER_CONFIG_FILE
from smallm.text.tokenizer import TIKTOKEN_FILE, TOKENIZER_FILE, TOKENIZER_FILES, Tokenizer
from smallm.text.training import DEFAULT_SPECIAL_TOKENS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallm-tokenize",
        description="Train a byte-level BPE tokenizer on a corpus and pack the corpus into token shards.",
    )
    p.add_argument(
        "corpus",
        nargs="*",
        help=f"files (.txt, .jsonl, .parquet, .gz), directories or globs; {STDLIB_CORPUS}: the Python stdlib",
    )
    p.add_argument("--out", type=Path, help="output directory (not with --dry-run-filters)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size incl. 256 bytes and special tokens")
    p.add_argument("--tokenizer", type=Path, help="reuse the tokenizer in this directory instead of training")
    p.add_argument(
        "--extend",
        type=int,
        metavar="N",
        help="add N tokens learned on the corpus to --tokenizer's, after its last id (no id or merge changes)",
    )
    p.add_argument("--no-shards", action="store_true", help="only train and save the tokenizer")

    g = p.add_argument_group("documents")
    g.add_argument(
        "--doc-mode",
        choices=("file", "line", "paragraph"),
        default="file",
        help="what a document is in a text file: the file, each line, or each blank-line separated paragraph",
    )
    g.add_argument("--text-field", default="text", help="field holding the text in jsonl, parquet and datasets")
    g.add_argument("--ext", default=",".join(DEFAULT_EXTENSIONS), help="file endings taken from directories")
    g.add_argument("--lossy", action="store_true", help="replace invalid UTF-8 with U+FFFD instead of failing")
    g.add_argument("--hf-dataset", help="a datasets name or builder (json, parquet, text), read streaming")
    g.add_argument("--hf-config", help="the dataset configuration")
    g.add_argument("--split", default="train", help="the dataset split to read (default: %(default)s)")
    g.add_argument("--hf-data-files", nargs="+", help="data files for a local builder such as json")

    g = p.add_argument_group("tokenizer training")
    g.add_argument("--pattern", default="gpt4", help="pre-tokenization: gpt4, gpt2 or a regex (default gpt4)")
    g.add_argument(
        "--special-tokens",
        default=",".join(DEFAULT_SPECIAL_TOKENS),
        help="comma-separated special tokens, given the ids after the merges (default: %(default)s)",
    )
    g.add_argument("--min-frequency", type=int, default=2, help="do not merge pairs seen fewer times")
    g.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="with --extend on a SentencePiece-style tokenizer: the share of the corpus's characters its "
        "vocabulary should cover (missing characters get tokens first; default %(default)s)",
    )

    g = p.add_argument_group("shards")
    defaults = PackOptions()
    g.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="validation share of documents")
    g.add_argument("--shard-tokens", type=int, default=defaults.shard_tokens, help="most tokens per shard")

    add_cleaning_arguments(p)
    p.add_argument(
        "--report",
        action="store_true",
        help="print characters and bytes per token per source and script, and the Hangul syllables that are tokens",
    )
    p.add_argument("--force", action="store_true", help="replace what is already in --out")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        corpus = find_corpus(args)
        clean = clean_settings(args)
        if args.dry_run_filters is not None:
            return dry_run(args, corpus, clean)
        check_options(args)
        in_place = args.tokenizer is not None and same_path(args.tokenizer, args.out)
        resuming = (args.out / JOURNAL).exists() and not args.no_shards and not args.force
        inputs = [*args.corpus, *(args.hf_data_files or []), None if in_place else args.tokenizer, *args.dedup_against]
        keep = TOKENIZER_FILES if in_place or resuming else ()  # the tokenizer packed with, read there
        with claim(args.out, TOKENIZED, force=args.force, command="smallm-tokenize", inputs=inputs,
                   continuing=resuming, keep=keep) as destination:  # fmt: skip
            destination.clear()  # under --force: what an earlier smallm-tokenize wrote there
            tokenizer = get_tokenizer(args, corpus, resuming, in_place)
            if not args.no_shards:
                write_shards(args, corpus, tokenizer)
        if args.report:
            print(f"\nthe tokenizer of {args.out} on the corpus (vocabulary {tokenizer.vocab_size}):\n")
            print(tokenizer_report(tokenizer, corpus, num_threads=args.threads).table())
        return 0

    return run_command(
        "smallm-tokenize", body, on_interrupt="interrupted; finished shards are kept and a re-run resumes"
    )


FILTER_FLAGS = {
    "min_words": int, "max_words": int, "min_mean_word_length": float, "max_mean_word_length": float,
    "max_symbol_ratio": float, "max_bullet_lines": float, "max_ellipsis_lines": float, "min_alpha_words": float,
    "max_digit_ratio": float, "max_dup_lines": float, "max_dup_line_chars": float,
}  # fmt: skip


def add_cleaning_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cleaning (smallm.data.cleaning): filters, then exact, then near duplicates")
    g.add_argument("--dedup", choices=("exact", "near"), help="remove exact duplicates, or exact and near ones")
    g.add_argument("--near-shingle", default="words:5", metavar="UNIT:N",
                   help="near duplicates' shingles: words:N or chars:N (default words:5; chars:5 suits short "
                   "Korean text)")  # fmt: skip
    g.add_argument("--near-bands", type=int, default=14, help="LSH bands (default 14)")
    g.add_argument("--near-rows", type=int, default=8, help="MinHash rows per band (default 8: similarity ~0.72)")
    g.add_argument("--dedup-against", type=Path, action="append", default=[], metavar="DIR",
                   help="shards packed before with --dedup: their documents count as earlier (repeatable)")  # fmt: skip
    g.add_argument("--quality", choices=("gopher",), help="every Gopher filter at its paper's threshold")
    for name, kind in FILTER_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, metavar="N" if kind is int else "SHARE")
    g.add_argument("--min-script", metavar="SCRIPT:SHARE", help="least share of letters in a script (hangul:0.5)")
    g.add_argument("--max-top-ngram-chars", metavar="N:SHARE,...", help="most of the text in the top word n-gram")
    g.add_argument("--max-dup-ngram-chars", metavar="N:SHARE,...", help="most of the text in repeated n-grams")
    g.add_argument("--filter", metavar="MODULE:FUNCTION", help="your filter: function(text) -> keep it")
    g.add_argument("--dry-run-filters", type=int, nargs="?", const=5, metavar="SAMPLES",
                   help="judge only: print what each rule removes and SAMPLES (5) documents of each; "
                   "write nothing")  # fmt: skip


def clean_settings(args: argparse.Namespace) -> CleanSettings:
    """The cleaning the flags ask for: the --quality preset, with the filters given one by one over it."""
    from smallm.data.cleaning import GOPHER

    filters: dict[str, Any] = dict(GOPHER) if args.quality == "gopher" else {}
    filters.update({name: getattr(args, name) for name in FILTER_FLAGS if getattr(args, name) is not None})
    if args.min_script:
        script, _, share = args.min_script.partition(":")
        filters["min_script"] = [script.lower(), _number("--min-script", share)]
    for flag in ("max_top_ngram_chars", "max_dup_ngram_chars"):
        if getattr(args, flag):
            pairs = [item.partition(":") for item in getattr(args, flag).split(",") if item]
            filters[flag] = [[int(_number(f"--{flag.replace('_', '-')}", n)), _number(flag, v)] for n, _, v in pairs]
    unit, _, size = args.near_shingle.partition(":")
    return CleanSettings(
        dedup=args.dedup or "off", near_unit=unit, near_shingle=int(_number("--near-shingle", size)),
        near_bands=args.near_bands, near_rows=args.near_rows, filters=filters, python_filter=args.filter,
        dedup_against=tuple(str(d) for d in args.dedup_against),
    )  # fmt: skip


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a number") from None


def dry_run(args: argparse.Namespace, corpus: Corpus, clean: CleanSettings) -> int:
    if not clean.active:
        raise ValueError("--dry-run-filters shows what the cleaning flags remove: give --dedup, --quality or a filter")
    report = judge_corpus(
        corpus, clean, samples=args.dry_run_filters, progress=not args.quiet, num_threads=args.threads
    )
    print(report_table(report, source_names(corpus)))
    for sample in report["samples"]:
        text = sample["text"].replace("\n", " ")
        print(
            f"\n[{sample['rule']}] {source_names(corpus)[sample['source']]}, document {sample['document']}:\n  {text}"
        )
    return 0


def source_names(corpus: Corpus) -> list[str]:
    return [d.get("path") or d.get("hf_dataset", "?") for d in corpus.describe()]


def same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def find_corpus(args: argparse.Namespace) -> Corpus:
    if not args.corpus and not args.hf_dataset:
        raise CorpusError("give corpus files, directories or globs, or --hf-dataset")
    extensions = [e.strip() for e in args.ext.split(",") if e.strip()]
    files = find_corpus_files(args.corpus, extensions) if args.corpus else []
    return Corpus(
        files=files,
        doc_mode=args.doc_mode,
        text_field=args.text_field,
        lossy=args.lossy,
        hf_dataset=args.hf_dataset,
        hf_config=args.hf_config,
        hf_split=args.split,
        hf_data_files=args.hf_data_files,
    )


def check_options(args: argparse.Namespace) -> None:
    """Refuses bad options before any work (training can take long) and before --out is touched."""
    for flag, value, least in (("--vocab", args.vocab, 1), ("--min-frequency", args.min_frequency, 0),
                               ("--threads", args.threads, 1)):  # fmt: skip
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if args.extend is not None:
        if args.extend < 1:
            raise ValueError(f"--extend must be at least 1, got {args.extend}")
        if args.tokenizer is None:
            raise ValueError("--extend adds tokens to a tokenizer: name it with --tokenizer (a run or its folder)")
        if same_path(args.tokenizer, args.out):
            raise ValueError("--extend writes a new tokenizer: give an --out other than --tokenizer")
    if args.out is None:
        raise ValueError("--out names the output directory (only --dry-run-filters writes nothing)")
    if args.no_shards:
        return
    PackOptions(shard_tokens=args.shard_tokens, val_fraction=args.val_fraction)
    specials = [s for s in args.special_tokens.split(",") if s]
    if args.tokenizer is None and "<|endoftext|>" not in specials:
        raise ValueError(
            "--special-tokens must include <|endoftext|>: shards mark where each document starts with it "
            "(or pass --no-shards to only train a tokenizer)"
        )


def get_tokenizer(args: argparse.Namespace, corpus: Corpus, resuming: bool, in_place: bool) -> Tokenizer:
    """Loads --tokenizer, or the tokenizer of the run being resumed, or trains one; saves it to --out."""
    if args.tokenizer is not None or resuming:
        source = args.tokenizer if args.tokenizer is not None and not (resuming and args.extend) else args.out
        tokenizer = Tokenizer.load(source)
        note = "resuming an interrupted run with" if resuming and source == args.out else "using"
        print(f"{note} the tokenizer in {source} (vocab {tokenizer.vocab_size})", file=sys.stderr)
    else:
        tokenizer = train_tokenizer(args, corpus)
    if resuming or in_place:
        return tokenizer  # already in --out
    if args.extend:
        tokenizer = extend(args, corpus, tokenizer)
        tokenizer.save(args.out)
    elif args.tokenizer is not None:
        # tokenizer.json as it is (the shards' manifest records its sha256); the tiktoken ranks from it.
        ranks = tokenizer.core.to_tiktoken()
        given = args.tokenizer / TIKTOKEN_FILE
        if given.is_file() and given.read_text(encoding="utf-8", errors="replace") != ranks:
            raise ValueError(
                f"{given} does not hold the ranks of {args.tokenizer / TOKENIZER_FILE} beside it (a file of "
                "another tokenizer?); delete it, and it is written anew from tokenizer.json"
            )
        copy_file_atomic(args.tokenizer / TOKENIZER_FILE, args.out / TOKENIZER_FILE)
        if ranks:  # none for a SentencePiece-style BPE
            write_text_atomic(args.out / TIKTOKEN_FILE, ranks)
        if tokenizer.foreign:  # the roles of its special tokens, read from the files beside it
            write_json_atomic(args.out / TOKENIZER_CONFIG_FILE, tokenizer.roles.to_config())
            print(f"documents start with {tokenizer.roles.document} (from {tokenizer.roles.source})", file=sys.stderr)
    else:
        tokenizer.save(args.out)
    ranks = "" if tokenizer.sentencepiece else f" and {args.out / TIKTOKEN_FILE}"  # tiktoken runs byte-level BPE only
    print(f"saved {args.out / TOKENIZER_FILE}{ranks}", file=sys.stderr)
    return tokenizer


def train_tokenizer(args: argparse.Namespace, corpus: Corpus) -> Tokenizer:
    specials = [s for s in args.special_tokens.split(",") if s]
    what = f"{len(corpus.files)} file(s), {corpus.total_file_bytes() / 1e6:.1f} MB"
    if corpus.hf_dataset:
        what += f" and dataset {corpus.hf_dataset}"
    print(f"training a {args.vocab}-token tokenizer on {what}", file=sys.stderr)
    start = time.perf_counter()
    tokenizer = Tokenizer.train_from_corpus(
        corpus,
        args.vocab,
        pattern=args.pattern,
        special_tokens=specials,
        min_frequency=args.min_frequency,
        progress=not args.quiet,
        num_threads=args.threads,
    )
    report = tokenizer.training_report or {}
    print(
        f"trained in {time.perf_counter() - start:.1f} s: {report.get('documents', 0)} documents, "
        f"{report.get('total_pieces', 0)} pieces ({report.get('unique_pieces', 0)} distinct), "
        f"vocab {tokenizer.vocab_size}",
        file=sys.stderr,
    )
    if tokenizer.vocab_size < args.vocab:
        print(
            f"warning: the corpus ran out of pairs seen at least {args.min_frequency} times; "
            f"the vocabulary reached {tokenizer.vocab_size}, not the {args.vocab} asked for",
            file=sys.stderr,
        )
    return tokenizer


def extend(args: argparse.Namespace, corpus: Corpus, tokenizer: Tokenizer) -> Tokenizer:
    start = time.perf_counter()
    extended, report = extend_tokenizer(
        tokenizer,
        corpus,
        args.extend,
        min_frequency=args.min_frequency,
        character_coverage=args.character_coverage,
        progress=not args.quiet,
        num_threads=args.threads,
    )
    last = report.first_id + report.new_tokens - 1
    characters = f"{report.characters} characters and " if tokenizer.sentencepiece else ""
    print(
        f"extended in {time.perf_counter() - start:.1f} s by {report.new_tokens} tokens ({characters}"
        f"{report.new_tokens - report.characters} merges) on ids {report.first_id}-{last}; characters per token "
        f"on this corpus: {report.chars_per_token_before:.3f} before, {report.chars_per_token_after:.3f} after",
        file=sys.stderr,
    )
    if report.new_tokens < args.extend:
        print(
            f"warning: the corpus ran out of pairs seen at least {args.min_frequency} times; "
            f"{report.new_tokens} tokens were added, not the {args.extend} asked for",
            file=sys.stderr,
        )
    return extended


def write_shards(args: argparse.Namespace, corpus: Corpus, tokenizer: Tokenizer) -> None:
    options = PackOptions(shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, clean=clean_settings(args))
    start = time.perf_counter()
    manifest = pack_corpus(corpus, tokenizer, args.out, options, progress=not args.quiet, num_threads=args.threads)
    seconds = time.perf_counter() - start
    totals = manifest["totals"]
    all_bytes = sum(t["text_bytes"] for t in totals.values())
    all_tokens = sum(t["tokens"] for t in totals.values())
    print(
        f"packed in {seconds:.1f} s ({all_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s, "
        f"{all_tokens / 1e6 / max(seconds, 1e-9):.2f}M tokens/s) into {args.out}:"
    )
    print(f"  {'split':<6} {'shards':>6} {'documents':>10} {'tokens':>12} {'bytes/token':>11}")
    for name, t in totals.items():
        counts = f"{t['shards']:>6} {t['documents']:>10} {t['tokens']:>12}"
        print(f"  {name:<6} {counts} {t['bytes_per_token']:>11.3f}")
    if "cleaning" in manifest:
        print("\ncleaning (documents removed by each rule; manifest.json has the bytes too):")
        print(report_table(manifest["cleaning"], source_names(corpus)))


if __name__ == "__main__":
    sys.exit(main())
