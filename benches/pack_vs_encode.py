"""Benchmark: the whole packing step against bare batch encoding of the same documents.

Packing (``smallm-tokenize --tokenizer TOK``: find the files, read them, cut documents, encode, pick
the split, write shards, index and manifest) should cost little more than encoding alone. Measured,
best of ``--repeats`` (default 3) rounds that run each measurement in turn, on the same documents:

* **bare encode**: ``tok.encode_ordinary_batch(docs, return_numpy=True)`` on the documents already in
  memory (every corpus file is one document, as in ``--doc-mode file``; reading is not timed);
* **pack_corpus in-process**: :func:`smallm.data.shards.pack_corpus` into a fresh directory (no interpreter
  start-up, no tokenizer loading);
* **smallm-tokenize end to end**: the console script as a subprocess into a fresh directory, wall time
  from start to exit, and the "packed in" time the same run prints for its packing stage;
* the fixed costs the command pays: a fresh interpreter importing ``smallm.cli.tokenize``, and
  loading the tokenizer and saving it into the output directory.

MB/s and tokens/s use the same work for every row: the documents' UTF-8 bytes (MB = 10**6 bytes) and
their tokens without the one ``<|endoftext|>`` per document that shards add. The target is packing
end to end within 1.3x the bare encode time.

The corpus is ``../shared/data/*.txt`` (relative to the repository root) plus the Python standard
library's sources (``smallm.text.corpus.stdlib_sources()``); the standard library alone when ../shared is
absent. A 32000-id tokenizer is trained on it first unless ``--tokenizer DIR`` gives one. Run from
anywhere, after building smallm in release mode::

    python benches/pack_vs_encode.py [--tokenizer DIR] [--repeats 3] [--json out.json]

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import smallm
from _machine import cpu_model, load_average, usable_cores
from smallm import Tokenizer
from smallm.data.cleaning import GOPHER, CleanSettings
from smallm.data.shards import MANIFEST, PackOptions, pack_corpus
from smallm.text.corpus import Corpus, stdlib_sources

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_ROOT = REPO_ROOT.parent / "shared" / "data"
MB = 1e6
TARGET_RATIO = 1.3
"""smallm-tokenize end to end should take at most this many times the bare encode."""

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def corpus_files(corpus_root: Path) -> tuple[list[Path], str]:
    """The reference corpus files in the order the command reads them, and a description."""
    shared = sorted(corpus_root.glob("*.txt")) if corpus_root.is_dir() else []
    stdlib = stdlib_sources()
    what = f"{len(stdlib)} stdlib .py files"
    if shared:
        what = f"{', '.join(p.name for p in shared)} + {what}"
    else:
        what += f" ({corpus_root} is absent)"
    return [*shared, *stdlib], what


def read_documents(files: Sequence[Path]) -> list[str]:
    """Each file's text as one document, as the core reads it in file mode (no newline translation, a
    leading byte order mark dropped, empty files left out)."""
    docs = []
    for path in files:
        text = path.read_bytes().decode("utf-8")
        text = text[1:] if text.startswith("\ufeff") else text
        if text:
            docs.append(text)
    return docs


def interleaved(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Runs every measurement once per round, ``repeats`` rounds, so that a burst of other work on the
    machine slows all of them alike; each one's times (seconds it measured), sorted."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(1, repeats + 1):
        for name, run in runs.items():
            times[name].append(run())
        log(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    return {name: sorted(t) for name, t in times.items()}


def console_script() -> list[str]:
    """The ``smallm-tokenize`` entry point next to this interpreter (not a version-manager shim, whose
    own start-up would be counted), else the one on PATH, else ``python -m``."""
    here = Path(sys.executable).parent / "smallm-tokenize"
    if here.is_file():
        return [str(here)]
    found = shutil.which("smallm-tokenize")
    return [found] if found else [sys.executable, "-m", "smallm.cli.tokenize"]


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "smallm": smallm.__version__,
        "numpy": np.__version__,
        "load_average_start": load_average(),
    }


def run_benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    machine = machine_info()
    files, corpus_what = corpus_files(args.corpus_root)
    log(f"corpus: {corpus_what}")
    if args.tokenizer is not None:
        tok_dir = args.tokenizer
        tok = Tokenizer.load(tok_dir)
        train_s = None
        log(f"using the tokenizer in {tok_dir} (vocab {tok.vocab_size})")
    else:
        log(f"training a {args.vocab}-id tokenizer")
        start = time.perf_counter()
        tok = Tokenizer.train_from_files(files, args.vocab)
        train_s = time.perf_counter() - start
        tok_dir = scratch / "tokenizer"
        tok.save(tok_dir)
        log(f"trained in {train_s:.1f} s")

    docs = read_documents(files)
    text_bytes = sum(len(d.encode("utf-8")) for d in docs)
    log(f"{len(docs)} documents, {text_bytes / MB:.1f} MB")

    tokens = 0

    def bare_encode() -> float:
        nonlocal tokens
        start = time.perf_counter()
        encoded = tok.encode_ordinary_batch(docs, return_numpy=True)
        seconds = time.perf_counter() - start
        tokens = sum(len(ids) for ids in encoded)
        return seconds

    bare_encode()  # warm-up (thread pool, output buffers), and the token count the checks compare with

    run_id = 0

    def fresh_dir(kind: str) -> Path:
        nonlocal run_id
        run_id += 1
        return scratch / f"{kind}-{run_id}"

    def check_manifest(out: Path) -> None:
        totals = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["totals"].values()
        packed_docs = sum(t["documents"] for t in totals)
        packed_content = sum(t["tokens"] for t in totals) - packed_docs
        if (packed_docs, packed_content) != (len(docs), tokens):
            raise SystemExit(
                f"{out}: packed {packed_docs} documents / {packed_content} tokens, but the bare encode "
                f"saw {len(docs)} / {tokens}: not the same work"
            )

    def in_process() -> float:
        out = fresh_dir("api")
        tok.save(out)
        corpus = Corpus(files=files)
        start = time.perf_counter()
        pack_corpus(corpus, tok, out, PackOptions(), progress=False)
        seconds = time.perf_counter() - start
        check_manifest(out)
        shutil.rmtree(out)
        return seconds

    def with_cleaning(clean: CleanSettings) -> Callable[[], float]:
        """pack_corpus in-process with cleaning on: the same documents read, some of them not packed."""

        def run() -> float:
            out = fresh_dir("clean")
            tok.save(out)
            start = time.perf_counter()
            manifest = pack_corpus(Corpus(files=files), tok, out, PackOptions(clean=clean), progress=False)
            seconds = time.perf_counter() - start
            read = sum(r["read"]["documents"] for r in manifest["cleaning"]["sources"].values())
            if read != len(docs):
                raise SystemExit(f"cleaning read {read} documents of {len(docs)}")
            shutil.rmtree(out)
            return seconds

        return run

    command = console_script()
    packed_in: list[float] = []

    def end_to_end() -> float:
        out = fresh_dir("cli")
        argv = [*command, *map(str, files), "--tokenizer", str(tok_dir), "--out", str(out), "--quiet"]
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"smallm-tokenize failed ({proc.returncode}):\n{proc.stderr}")
        found = re.search(r"packed in ([0-9.]+) s", proc.stdout)
        if found:
            packed_in.append(float(found.group(1)))
        check_manifest(out)
        shutil.rmtree(out)
        return seconds

    def startup() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import smallm.cli.tokenize"], check=True)
        return time.perf_counter() - start

    def tokenizer_load_save() -> float:
        out = fresh_dir("tok")
        start = time.perf_counter()
        Tokenizer.load(tok_dir).save(out)
        seconds = time.perf_counter() - start
        shutil.rmtree(out)
        return seconds

    runs = {"bare_encode": bare_encode, "pack_corpus": in_process, "cli_wall": end_to_end,
            "pack_dedup_exact": with_cleaning(CleanSettings(dedup="exact")),
            "pack_dedup_near": with_cleaning(CleanSettings(dedup="near")),
            "pack_dedup_near_gopher": with_cleaning(CleanSettings(dedup="near", filters=dict(GOPHER)))}  # fmt: skip
    fixed = {"interpreter_start_import": startup, "tokenizer_load_save": tokenizer_load_save}
    seconds = interleaved(args.repeats, {**runs, **fixed})

    return {
        "machine": {
            **machine,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "corpus": corpus_what,
        "files": len(files),
        "documents": len(docs),
        "text_bytes": text_bytes,
        "tokens": tokens,
        "vocab_size": tok.vocab_size,
        "train_s": train_s,
        "command": " ".join(Path(command[0]).name if i == 0 else c for i, c in enumerate(command)),
        "seconds": {**seconds, "cli_packed_in": sorted(packed_in)},
    }


def render_report(f: dict[str, Any]) -> str:
    m, s = f["machine"], f["seconds"]
    bare = s["bare_encode"][0]
    lines = [
        "# Packing vs bare encoding",
        "",
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable), {m['os']}, "
        f"Python {m['python']}, smallm {m['smallm']}, numpy {m['numpy']}. "
        f"Load average at start {tuple(round(x, 2) for x in m['load_average_start'] or ())}, "
        f"at end {tuple(round(x, 2) for x in m['load_average_end'] or ())}.",
        "",
        f"Corpus: {f['corpus']}: {f['documents']} documents (one per file), {f['text_bytes'] / MB:.1f} MB, "
        f"{f['tokens']:,} tokens with a {f['vocab_size']}-id tokenizer"
        + (f" (trained in {f['train_s']:.1f} s)." if f["train_s"] is not None else " (given)."),
        "Rates use the same work for every row: these bytes and tokens (without the BOS per document).",
        "",
        f"| measurement (best of {len(s['bare_encode'])}, interleaved) | seconds | MB/s | M tokens/s "
        "| vs bare encode |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(name: str, seconds: float) -> None:
        rate = f"{f['text_bytes'] / MB / seconds:.1f} | {f['tokens'] / 1e6 / seconds:.2f}"
        lines.append(f"| {name} | {seconds:.3f} | {rate} | {seconds / bare:.2f}x |")

    row("bare `encode_ordinary_batch(docs, return_numpy=True)`, docs in memory", bare)
    row("`smallm.data.shards.pack_corpus` in-process (reads files, writes shards)", s["pack_corpus"][0])
    row("  the same with `--dedup exact`", s["pack_dedup_exact"][0])
    row("  the same with `--dedup near` (word 5-grams, 14 x 8)", s["pack_dedup_near"][0])
    row("  the same with `--dedup near --quality gopher`", s["pack_dedup_near_gopher"][0])
    row(f"`{f['command']} FILES --tokenizer TOK --out OUT --quiet` wall (subprocess)", s["cli_wall"][0])
    if s["cli_packed_in"]:
        row('  the same runs\' own "packed in" time (printed to 0.1 s)', s["cli_packed_in"][0])
    fixed = (
        ("fixed cost: fresh interpreter + `import smallm.cli.tokenize`", s["interpreter_start_import"][0]),
        ("fixed cost: `Tokenizer.load(TOK).save(OUT)`, which the command does", s["tokenizer_load_save"][0]),
    )
    for name, seconds in fixed:
        lines.append(f"| {name} | {seconds:.3f} | | | {seconds / bare:.2f}x |")
    ratio = s["cli_wall"][0] / bare
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    lines += [
        "",
        f"End to end / bare encode = **{ratio:.2f}x** ({verdict} the target <= {TARGET_RATIO}x); "
        f"in-process pack_corpus / bare encode = {s['pack_corpus'][0] / bare:.2f}x. "
        "The fixed costs do not grow with the corpus.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, help="reuse the tokenizer in this directory instead of training")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size to train (default %(default)s)")
    p.add_argument("--corpus-root", type=Path, default=DEFAULT_CORPUS_ROOT, help="folder of *.txt files")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best is reported")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smallm-pack-bench-") as scratch:
        figures = run_benchmark(args, Path(scratch))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    print(render_report(figures))


if __name__ == "__main__":
    main()
