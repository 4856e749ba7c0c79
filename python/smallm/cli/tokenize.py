"""``smallm-tokenize``: the data step. Finds the corpus, trains a byte-level BPE tokenizer and saves it.

    smallm-tokenize CORPUS... --vocab 32000 --out DIR [--doc-mode file|line|paragraph]
    smallm-tokenize @stdlib --vocab 8000 --out tok/     # the Python standard library as corpus

The command is organised as stages (find the corpus, get a tokenizer, write the outputs) so that
packing the corpus into token shards slots in after the tokenizer stage.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from smallm.corpus import DEFAULT_EXTENSIONS, STDLIB_CORPUS, CorpusError, find_corpus_files
from smallm.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="smallm-tokenize",
        description="Train a byte-level BPE tokenizer on a corpus and save it to --out "
        "(tokenizer.json for Hugging Face, tokenizer.tiktoken for tiktoken).",
    )
    p.add_argument(
        "corpus",
        nargs="+",
        help=f"text files, directories or globs; {STDLIB_CORPUS} for the Python standard library sources",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument(
        "--vocab", type=int, default=32000, help="vocabulary size incl. 256 bytes and special tokens"
    )
    p.add_argument(
        "--doc-mode",
        choices=("file", "line", "paragraph"),
        default="file",
        help="what one document is: a whole file, each line, or each blank-line separated paragraph",
    )
    p.add_argument("--pattern", default="gpt4", help="pre-tokenization: gpt4, gpt2 or a regex (default gpt4)")
    p.add_argument(
        "--special-tokens",
        default=",".join(DEFAULT_SPECIAL_TOKENS),
        help="comma-separated special tokens, given the ids after the merges (default: %(default)s)",
    )
    p.add_argument("--min-frequency", type=int, default=2, help="do not merge pairs seen fewer times")
    p.add_argument(
        "--ext",
        default=",".join(DEFAULT_EXTENSIONS),
        help="file endings taken from directories (default: %(default)s)",
    )
    p.add_argument(
        "--lossy", action="store_true", help="replace invalid UTF-8 with U+FFFD instead of failing"
    )
    p.add_argument("--force", action="store_true", help="overwrite a tokenizer already in --out")
    p.add_argument("--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = find_corpus_files(args.corpus, [e.strip() for e in args.ext.split(",") if e.strip()])
        check_output_dir(args.out, args.force)
        tokenizer = train_tokenizer(args, files)
        tokenizer.save(args.out)
    except (CorpusError, ValueError, OSError) as e:
        print(f"smallm-tokenize: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("smallm-tokenize: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"saved {args.out / 'tokenizer.json'} and {args.out / 'tokenizer.tiktoken'}")
    return 0


def check_output_dir(out: Path, force: bool) -> None:
    """Refuses to replace a tokenizer that is already there unless ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    existing = [n for n in ("tokenizer.json", "tokenizer.tiktoken") if (out / n).exists()]
    if existing and not force:
        raise ValueError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite")


def train_tokenizer(args: argparse.Namespace, files: list[Path]) -> Tokenizer:
    specials = [s for s in args.special_tokens.split(",") if s]
    total = sum(f.stat().st_size for f in files)
    print(
        f"training a {args.vocab}-token tokenizer on {len(files)} file(s), {total / 1e6:.1f} MB",
        file=sys.stderr,
    )
    start = time.perf_counter()
    tokenizer = Tokenizer.train_from_files(
        files,
        args.vocab,
        pattern=args.pattern,
        special_tokens=specials,
        doc_mode=args.doc_mode,
        lossy=args.lossy,
        min_frequency=args.min_frequency,
        progress=not args.quiet,
        num_threads=args.threads,
    )
    report = tokenizer.training_report or {}
    seconds = time.perf_counter() - start
    print(
        f"trained in {seconds:.1f} s: {report.get('documents', 0)} documents, "
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


if __name__ == "__main__":
    sys.exit(main())
