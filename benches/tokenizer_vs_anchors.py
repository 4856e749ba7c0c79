"""Benchmark smallm's byte-level BPE tokenizer against the implementations people already use.

What is measured, all in one run on one machine so the figures are comparable:

* **Training** (same documents, same GPT-4 split pattern, same total vocabulary): smallm
  ``Tokenizer.train_from_files`` against Hugging Face ``tokenizers`` (``BpeTrainer`` with a
  GPT-4-split + byte-level pre-tokenizer) and Karpathy's ``rustbpe``. Each trainer runs in its own
  fresh subprocess (``--worker`` mode of this script) so its peak memory is its own: wall time is
  taken inside the child after the imports (reading the files is included) and peak RSS is the
  child's ``VmHWM`` from ``/proc/self/status``. ``getrusage(RUSAGE_SELF).ru_maxrss`` is *not* used:
  on Linux a child started with fork/vfork + exec inherits the parent's high-water mark, so it
  reports the parent's size whenever the parent is bigger than the trainer.
* **Encoding** with the tokenizer smallm trained, loaded into tiktoken (``tokenizer.tiktoken``) and
  into ``tokenizers`` (``tokenizer.json``). The three must give identical ids on the whole corpus,
  otherwise the run stops with the smallest text it can find that shows the difference. Then:
  (a) the whole corpus as one string, single-threaded; (b) every non-empty line of the corpus as a
  document, batched with each library's own parallelism; (c) a scaling check on one huge
  pre-token ("a" * N and a run of Hangul syllables, 1 MB vs 4 MB) where linear work gives ~4x.
* **Compression**: bytes per token of smallm's tokenizer on each corpus part and overall.

The reference corpus is ``../shared/data/*.txt`` (relative to the repository root: tinyshakespeare,
Korean movie reviews) plus the ``.py`` sources of this interpreter's standard library outside test
folders: about 31 MB of prose, short Korean texts and code. MB below means 10**6 bytes of UTF-8.

Run from the repository root (``pip install -e '.[bench]'`` or the ``bench`` extra first)::

    python benches/tokenizer_vs_anchors.py --json /tmp/bench.json   # full run, several minutes
    python benches/tokenizer_vs_anchors.py --quick                  # ~3 MB smoke run

Progress goes to stderr, the markdown report to stdout.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from _machine import cpu_model, load_average, usable_cores

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS_ROOT = REPO_ROOT.parent / "shared" / "data"
STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})
PART_NAMES = {"tinyshakespeare": "shakespeare", "nsmc_reviews_ko": "nsmc"}
QUICK_FRACTION = 10  # --quick keeps about 1/10 of every part
TRAINERS = ("smallm", "hf", "rustbpe")
MB = 1e6
SLOW_RUN_S = 15.0  # a first run slower than this is repeated once instead of twice
SCALING_SIZES = (1_000_000, 4_000_000)
TARGET_TRAIN_TIME = 0.5  # smallm training wall time <= 0.5x rustbpe
TARGET_TRAIN_RSS = 1.0  # smallm training peak RSS <= rustbpe
TARGET_ONE_STRING = 2.0  # smallm one-string throughput >= 2x tiktoken
TARGET_BATCH = 10.0  # smallm batch throughput >= 10x tiktoken's encode_ordinary_batch

_T0 = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since start."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)


def import_with_retry(name: str, attempts: int = 5, wait_s: float = 60.0) -> Any:
    """Imports ``name``, waiting and retrying when it fails (the wheel may be being reinstalled)."""
    for attempt in range(1, attempts + 1):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as e:
            if attempt == attempts:
                raise
            log(f"import {name} failed ({e}); retrying in {wait_s:.0f}s ({attempt}/{attempts})")
            for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[key]
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def read_text(path: Path) -> str:
    """A file's text, bytes for bytes (no newline translation), as the Rust readers see it."""
    return path.read_bytes().decode("utf-8")


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (``VmHWM``; ``ru_maxrss`` where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


# ----- corpus -----------------------------------------------------------------------------------


@dataclass
class CorpusPart:
    """One named part of the corpus: its files, each one training document."""

    name: str
    files: list[Path]


@dataclass
class Corpus:
    parts: list[CorpusPart]
    notes: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [f for part in self.parts for f in part.files]


def stdlib_sources() -> tuple[Path, list[Path]]:
    """The standard library's ``.py`` files outside test folders and installed packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        folders = path.relative_to(root).parts[:-1]
        if STDLIB_SKIPPED_DIRS.intersection(folders) or STDLIB_EXCLUDED_DIRS.intersection(folders):
            continue
        if path.is_file():
            files.append(path)
    return root, files


def truncated_copy(path: Path, out_dir: Path, fraction: int) -> Path:
    """The first ``1/fraction`` of ``path``, cut after a newline, written to ``out_dir``."""
    data = path.read_bytes()
    cut = data.find(b"\n", len(data) // fraction)
    out = out_dir / path.name
    out.write_bytes(data if cut < 0 else data[: cut + 1])
    return out


def find_corpus(corpus_root: Path, quick: bool, scratch: Path) -> Corpus:
    """The reference corpus (or its ~1/10 subset for ``--quick``, written under ``scratch``)."""
    corpus = Corpus(parts=[])
    text_files = sorted(corpus_root.glob("*.txt")) if corpus_root.is_dir() else []
    if not text_files:
        corpus.notes.append(f"no *.txt under {corpus_root}: the corpus is the Python standard library only")
    for path in text_files:
        name = PART_NAMES.get(path.stem, path.stem)
        corpus.parts.append(CorpusPart(name, [truncated_copy(path, scratch, QUICK_FRACTION) if quick else path]))
    stdlib_root, stdlib_files = stdlib_sources()
    if quick:  # every 10th file, up to a tenth of the bytes
        budget = sum(f.stat().st_size for f in stdlib_files) // QUICK_FRACTION
        sample: list[Path] = []
        for f in stdlib_files[::QUICK_FRACTION]:
            if budget <= 0:
                break
            sample.append(f)
            budget -= f.stat().st_size
        stdlib_files = sample
    corpus.parts.append(CorpusPart("stdlib", stdlib_files))
    corpus.notes.append(f"stdlib: {len(stdlib_files)} .py files under {stdlib_root}")
    if quick:
        corpus.notes.append(
            f"--quick: first 1/{QUICK_FRACTION} of each text file; every {QUICK_FRACTION}th stdlib file "
            f"up to 1/{QUICK_FRACTION} of the stdlib bytes"
        )
    return corpus


# ----- training workers (each runs in its own subprocess) ----------------------------------------


def iter_file_texts(paths: Sequence[str]) -> Iterator[str]:
    """Each file's text in turn, read lazily so a trainer never holds more than it asks for."""
    for p in paths:
        yield read_text(Path(p))


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


def prepare_smallm(spec: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]:
    smallm = import_with_retry("smallm")

    def train() -> Any:
        return smallm.Tokenizer.train_from_files(
            spec["files"], spec["vocab"], pattern=spec["pattern"], special_tokens=spec["special_tokens"]
        )

    def describe(tok: Any) -> dict[str, Any]:
        tok.save(spec["save_dir"])
        n_ordinary = tok.vocab_size - len(tok.special_tokens)
        return {
            "vocab_size": tok.vocab_size,
            "merges": n_ordinary - 256,
            "special_tokens": len(tok.special_tokens),
            "tokens": [tok.token_bytes(i).hex() for i in range(256, n_ordinary)],
        }

    return train, describe


def prepare_hf(spec: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]:
    tokenizers = import_with_retry("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers

    def train() -> Any:
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec["pattern"]), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=spec["vocab"],
            min_frequency=2,
            special_tokens=spec["special_tokens"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(iter_file_texts(spec["files"]), trainer=trainer, length=len(spec["files"]))
        return tok

    def describe(tok: Any) -> dict[str, Any]:
        decode = byte_decoder()
        merges = json.loads(tok.to_str())["model"]["merges"]
        pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
        return {
            "vocab_size": tok.get_vocab_size(),
            "merges": len(pairs),
            "special_tokens": len(spec["special_tokens"]),
            "tokens": [bytes(decode[c] for c in a + b).hex() for a, b in pairs],
        }

    return train, describe


def prepare_rustbpe(spec: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[Any], dict[str, Any]]]:
    rustbpe = import_with_retry("rustbpe")
    n_special = len(spec["special_tokens"])

    def train() -> Any:
        tok = rustbpe.Tokenizer()
        # rustbpe has no special tokens: ask for the ordinary part of the vocabulary only.
        tok.train_from_iterator(iter_file_texts(spec["files"]), spec["vocab"] - n_special, pattern=spec["pattern"])
        return tok

    def describe(tok: Any) -> dict[str, Any]:
        ranks = sorted(tok.get_mergeable_ranks(), key=lambda item: item[1])
        return {
            "vocab_size": tok.vocab_size,
            "merges": tok.vocab_size - 256,
            "special_tokens": 0,
            "tokens": [bytes(token).hex() for token, rank in ranks if rank >= 256],
        }

    return train, describe


WORKERS = {"smallm": prepare_smallm, "hf": prepare_hf, "rustbpe": prepare_rustbpe}


def run_worker(trainer: str, spec_path: Path) -> None:
    """Child side: import, train (timed), then write figures and the learned tokens."""
    spec = json.loads(spec_path.read_text())
    train, describe = WORKERS[trainer](spec)
    rss_after_import = peak_rss_mb()
    start = time.perf_counter()
    tok = train()
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    result = {"wall_s": wall, "peak_rss_mb": peak, "rss_after_import_mb": rss_after_import, **describe(tok)}
    Path(spec["result_path"]).write_text(json.dumps(result))


@dataclass
class TrainResult:
    trainer: str
    ok: bool
    wall_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    rss_after_import_mb: float = float("nan")
    vocab_size: int = 0
    merges: int = 0
    special_tokens: int = 0
    error: str = ""


def train_in_subprocess(
    trainer: str, files: list[Path], vocab: int, pattern: str, specials: Sequence[str], work: Path
) -> tuple[TrainResult, list[bytes]]:
    """Runs one trainer in a fresh interpreter; returns its figures and its merged tokens in order."""
    spec = {
        "files": [str(f) for f in files],
        "vocab": vocab,
        "pattern": pattern,
        "special_tokens": list(specials),
        "save_dir": str(work / "smallm_tokenizer"),
        "result_path": str(work / f"train_{trainer}.json"),
    }
    spec_path = work / f"spec_{trainer}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", trainer, "--spec", str(spec_path)]
    log(f"training {trainer} in a subprocess ...")
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
    result_path = Path(spec["result_path"])
    if proc.returncode != 0 or not result_path.exists():
        log(f"training {trainer} FAILED (exit {proc.returncode})")
        return TrainResult(trainer, ok=False, error=f"exit code {proc.returncode}"), []
    data = json.loads(result_path.read_text())
    tokens = [bytes.fromhex(t) for t in data.pop("tokens")]
    result = TrainResult(trainer, ok=True, **data)
    log(f"  {trainer}: {result.wall_s:.2f}s, peak RSS {result.peak_rss_mb:.0f} MB, vocab {result.vocab_size}")
    return result, tokens


def merge_agreement(reference: list[bytes], other: list[bytes]) -> dict[str, int]:
    """How far two merge lists agree: common prefix length and tokens in common."""
    prefix = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    return {
        "same_order_prefix": prefix,
        "common_tokens": len(set(reference) & set(other)),
        "of": len(reference),
    }


# ----- encoding ---------------------------------------------------------------------------------


class Encoders:
    """smallm's trained tokenizer and the same vocabulary loaded into tiktoken and HF tokenizers."""

    names = ("smallm", "tiktoken", "hf")

    def __init__(self, tok_dir: Path) -> None:
        smallm = import_with_retry("smallm")
        tiktoken = import_with_retry("tiktoken")
        tiktoken_load = importlib.import_module("tiktoken.load")
        tokenizers = import_with_retry("tokenizers")

        self.smallm = smallm.Tokenizer.load(tok_dir)
        self.tiktoken = tiktoken.Encoding(
            name="smallm_bench",
            pat_str=self.smallm.pattern,
            mergeable_ranks=tiktoken_load.load_tiktoken_bpe(str(tok_dir / "tokenizer.tiktoken")),
            special_tokens=self.smallm.special_tokens,
        )
        self.hf = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        if self.tiktoken.n_vocab != self.smallm.vocab_size or self.hf.get_vocab_size() != self.smallm.vocab_size:
            raise SystemExit(
                f"vocab sizes differ after loading: smallm {self.smallm.vocab_size}, "
                f"tiktoken {self.tiktoken.n_vocab}, hf {self.hf.get_vocab_size()}"
            )

    def one(self, name: str, text: str) -> list[int]:
        """Encodes one string as plain text with implementation ``name``."""
        if name == "smallm":
            return self.smallm.encode_ordinary(text)
        if name == "tiktoken":
            return self.tiktoken.encode_ordinary(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def many(self, name: str, docs: list[str]) -> list[Any]:
        """Encodes a batch of documents as plain text with implementation ``name``."""
        if name == "smallm":
            return self.smallm.encode_ordinary_batch(docs)
        if name == "smallm_numpy":
            return self.smallm.encode_ordinary_batch(docs, return_numpy=True)
        if name == "tiktoken":
            return self.tiktoken.encode_ordinary_batch(docs)
        return [e.ids for e in self.hf.encode_batch(docs, add_special_tokens=False)]

    def all_agree(self, text: str) -> bool:
        ids = [self.one(name, text) for name in self.names]
        return ids[0] == ids[1] == ids[2]


def shrink(text: str, differs: Callable[[str], bool], budget: int = 4000) -> str:
    """A short text on which ``differs`` still holds: single lines first, then delta debugging."""
    lines = [line for line in text.splitlines(keepends=True) if line]
    if len(lines) > 1:
        for line in sorted(lines, key=len):
            if differs(line):
                text = line
                break
    granularity = 2
    while len(text) > 1 and budget > 0:
        chunk = -(-len(text) // granularity)
        for start in range(0, len(text), chunk):
            budget -= 1
            candidate = text[:start] + text[start + chunk :]
            if candidate and differs(candidate):
                text, granularity = candidate, max(granularity - 1, 2)
                break
        else:
            if granularity >= len(text):
                break
            granularity = min(len(text), granularity * 2)
    return text


def window_around_difference(text: str, ids_a: list[int], ids_b: list[int], token_len: Any) -> tuple[int, int]:
    """Character range around the first token where two encodings of ``text`` part ways."""
    first = next((i for i, (a, b) in enumerate(zip(ids_a, ids_b)) if a != b), min(len(ids_a), len(ids_b)))
    byte_offset = int(sum(int(token_len[i]) for i in ids_a[:first]))
    char_offset = len(text.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))
    return max(0, char_offset - 200), char_offset + 200


def report_mismatch(enc: Encoders, where: str, text: str, hint: tuple[int, int] | None) -> None:
    """Finds and prints the smallest text showing that the implementations disagree, then exits."""
    log(f"IDS DIFFER ({where}); looking for a small text that shows it ...")
    if hint is not None:
        lo, hi = hint
        while enc.all_agree(text[lo:hi]) and (lo > 0 or hi < len(text)):
            lo, hi = max(0, lo - (hi - lo)), hi + (hi - lo)
        text = text[lo:hi]
    small = shrink(text, lambda t: not enc.all_agree(t))
    lines = [f"\n**FAILED: smallm, tiktoken and HF tokenizers give different ids ({where}).**", ""]
    lines.append(f"Smallest text found ({len(small)} chars): `{small!r}`")
    for name in enc.names:
        lines.append(f"- {name}: {enc.one(name, small)}")
    print("\n".join(lines))
    raise SystemExit(1)


@dataclass
class VerifyResult:
    checked: list[str]
    bytes_per_token: dict[str, dict[str, float]]
    smallm_tokens_total: int


def verify_identical_ids(
    enc: Encoders, corpus: Corpus, file_texts: list[str], big: str, lines: list[str]
) -> VerifyResult:
    """Asserts the three implementations agree on every file, every line and the whole corpus."""
    token_len = enc.smallm.token_byte_lengths()
    specials = list(enc.smallm.special_tokens)
    checked = []
    per_part: dict[str, list[int]] = {}
    for where, docs in (("each file as a document", file_texts), ("each non-empty line", lines)):
        log(f"checking ids: {where} ({len(docs):,} docs) ...")
        ids = {name: enc.many(name, docs) for name in enc.names}
        skipped = 0
        for i, doc in enumerate(docs):
            if not ids["smallm"][i] == ids["tiktoken"][i] == ids["hf"][i]:
                if any(s in doc for s in specials):
                    skipped += 1  # HF always splits special token strings out: not an ordinary-text difference
                    continue
                report_mismatch(enc, f"{where}, document {i}", doc, None)
        note = f", {skipped} docs holding special token strings left out" if skipped else ""
        checked.append(f"{where} ({len(docs):,} docs{note})")
        if docs is file_texts:
            sizes = [len(d.encode("utf-8")) for d in docs]
            counts = [len(x) for x in ids["smallm"]]
            k = 0
            for part in corpus.parts:
                n = len(part.files)
                per_part[part.name] = [sum(sizes[k : k + n]), sum(counts[k : k + n])]
                k += n
        del ids
    log(f"checking ids: the whole corpus as one string ({len(big.encode('utf-8')) / MB:.1f} MB) ...")
    ids_big = {name: enc.one(name, big) for name in enc.names}
    for other in ("tiktoken", "hf"):
        if ids_big["smallm"] != ids_big[other]:
            hint = window_around_difference(big, ids_big["smallm"], ids_big[other], token_len)
            report_mismatch(enc, f"whole corpus as one string, smallm vs {other}", big, hint)
    if enc.smallm.decode_bytes(ids_big["smallm"]) != big.encode("utf-8"):
        raise SystemExit("FAILED: smallm's decode(encode(corpus)) is not the corpus")
    checked.append("the whole corpus as one string (and smallm decodes it back to the same bytes)")
    total_bytes = sum(b for b, _ in per_part.values())
    total_tokens = sum(t for _, t in per_part.values())
    per_part["overall"] = [total_bytes, total_tokens]
    bpt = {name: {"bytes": b, "tokens": t, "bytes_per_token": b / t} for name, (b, t) in per_part.items()}
    return VerifyResult(checked, bpt, len(ids_big["smallm"]))


def best_time(fn: Callable[[], object], repeats: int = 3) -> list[float]:
    """Wall times of ``fn`` (garbage collector off while timed, result freed outside the timing).

    A first run slower than ``SLOW_RUN_S`` is repeated once instead of ``repeats - 1`` times.
    """
    times: list[float] = []
    while len(times) < repeats:
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
        del out
        if len(times) == 1 and times[0] > SLOW_RUN_S:
            repeats = min(repeats, 2)
    return times


@dataclass
class EncodeResult:
    case: str
    implementation: str
    n_bytes: int
    times_s: list[float]
    threads: str

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes / MB / self.best_s


def bench_one_string(enc: Encoders, big: str) -> list[EncodeResult]:
    """(a) The whole corpus as one string, single-threaded."""
    n_bytes = len(big.encode("utf-8"))
    results = []
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by HF at each call; single-string encode is serial anyway
    try:
        for name, label in (
            ("smallm", "smallm encode_ordinary"),
            ("tiktoken", "tiktoken encode_ordinary"),
            ("hf", "HF encode(add_special_tokens=False).ids"),
        ):
            log(f"one string: {label} ...")
            times = best_time(lambda name=name: enc.one(name, big))
            results.append(EncodeResult("one string", label, n_bytes, times, "1"))
            log(f"  best {min(times):.2f}s of {[round(t, 2) for t in times]}")
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return results


def bench_batch(enc: Encoders, docs: list[str]) -> list[EncodeResult]:
    """(b) Many short documents, each library with its own default parallelism."""
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    cores = str(os.cpu_count())
    results = []
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    for name, label, threads in (
        ("smallm", "smallm encode_ordinary_batch (lists)", f"{cores} (rayon)"),
        ("smallm_numpy", "smallm encode_ordinary_batch(return_numpy=True)", f"{cores} (rayon)"),
        ("tiktoken", "tiktoken encode_ordinary_batch", "8 (its default)"),
        ("hf", "HF encode_batch(add_special_tokens=False) + .ids", f"{cores} (rayon)"),
    ):
        log(f"batch: {label} ...")
        times = best_time(lambda name=name: enc.many(name, docs))
        results.append(EncodeResult(f"{len(docs):,} lines, batched", label, n_bytes, times, threads))
        log(f"  best {min(times):.2f}s of {[round(t, 2) for t in times]}")
    return results


def hangul_run(texts: Sequence[str], n_bytes: int) -> str:
    """One unbroken run of Hangul syllables, ``n_bytes`` of UTF-8: corpus syllables if there are any."""
    syllables = "".join(re.findall("[\uac00-\ud7a3]+", "".join(texts)))
    if not syllables:
        rng = random.Random(0)
        syllables = "".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(n_bytes // 3))
    n_chars = n_bytes // 3
    return (syllables * (n_chars // len(syllables) + 1))[:n_chars]


@dataclass
class ScalingResult:
    text: str
    implementation: str
    seconds: dict[str, float]
    identical_ids: bool

    @property
    def ratio(self) -> float:
        small, large = SCALING_SIZES
        return self.seconds[str(large)] / self.seconds[str(small)]


def bench_scaling(enc: Encoders, texts: Sequence[str]) -> list[ScalingResult]:
    """(c) One huge pre-token at 1 MB and 4 MB: linear work takes ~4x as long."""
    makers: dict[str, Callable[[int], str]] = {
        '"a" * N': lambda n: "a" * n,
        "Hangul syllable run": lambda n: hangul_run(texts, n),
    }
    results = []
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for label, make in makers.items():
        inputs = {size: make(size) for size in SCALING_SIZES}
        identical = all(enc.all_agree(text) for text in inputs.values())
        if not identical:
            report_mismatch(enc, f"scaling input {label}", inputs[SCALING_SIZES[0]], None)
        for name in enc.names:
            seconds = {}
            for size, text in inputs.items():
                seconds[str(size)] = min(best_time(lambda name=name, text=text: enc.one(name, text)))
            results.append(ScalingResult(label, name, seconds, identical))
            log(f"scaling {label}, {name}: {seconds} -> {results[-1].ratio:.2f}x")
    return results


# ----- report -----------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    versions = {}
    for package in ("smallm", "tokenizers", "tiktoken", "rustbpe", "numpy", "psutil"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    info["versions"] = versions
    return info


def verdict(value: float, target: float, higher_is_better: bool) -> str:
    if value != value:  # NaN
        return "n/a"
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "**missed**"


def render_report(figures: dict[str, Any]) -> str:
    """The markdown report printed on stdout."""
    m = figures["machine"]
    v = m["versions"]
    out = ["# smallm tokenizer vs anchors", ""]
    out.append(
        f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m.get('physical_cores', '?')} physical), "
        f"{m.get('memory_gb', '?')} GB RAM, {m['os']}; Python {m['python']}; "
        + ", ".join(f"{k} {val}" for k, val in v.items())
    )
    c = figures["corpus"]
    parts = ", ".join(f"{p['name']} {p['mb']:.2f} MB ({p['files']} files)" for p in c["parts"])
    out.append(f"Corpus: {parts}; total {c['total_mb']:.2f} MB, {c['lines']:,} non-empty lines.")
    out.extend(f"Note: {n}" for n in c["notes"])
    out.append(f"Command: `{figures['command']}`")
    if m.get("load_average_at_start") is not None:
        start, end = m["load_average_at_start"], figures.get("load_average_at_end")
        out.append(
            f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in start)}, "
            f"at end {tuple(round(x, 2) for x in end)}: other work on the machine skews the timings."
        )
    out.append("")

    t = figures["training"]
    out.append(f"## Training (requested vocab {t['vocab']}, GPT-4 pattern, each trainer in a fresh subprocess)")
    out.append("")
    out.append(
        "| trainer | vocab (bytes + merges + specials) | wall s | peak RSS MB | RSS after imports MB "
        "| time vs rustbpe | peak RSS vs rustbpe |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|")
    rb = t["results"].get("rustbpe", {})
    for name, r in t["results"].items():
        if not r["ok"]:
            out.append(f"| {name} | FAILED: {r['error']} | | | | | |")
            continue
        time_ratio = r["wall_s"] / rb["wall_s"] if rb.get("ok") else float("nan")
        rss_ratio = r["peak_rss_mb"] / rb["peak_rss_mb"] if rb.get("ok") else float("nan")
        vocab = f"{r['vocab_size']} = 256 + {r['merges']} + {r['special_tokens']}"
        out.append(
            f"| {name} | {vocab} | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_after_import_mb']:.0f} | {time_ratio:.2f}x | {rss_ratio:.2f}x |"
        )
    out.append("")
    tg = t["targets"]
    out.append(
        f"Targets: smallm time <= {TARGET_TRAIN_TIME}x rustbpe: {tg['time_ratio']:.2f}x, "
        f"{verdict(tg['time_ratio'], TARGET_TRAIN_TIME, False)}; smallm peak RSS <= rustbpe: "
        f"{tg['rss_ratio']:.2f}x, {verdict(tg['rss_ratio'], TARGET_TRAIN_RSS, False)}."
    )
    out.extend(f"Note: {n}" for n in t["notes"])
    for name, agreement in t["merge_agreement"].items():
        out.append(
            f"Merges smallm vs {name}: identical order for the first {agreement['same_order_prefix']} of "
            f"{agreement['of']}; {agreement['common_tokens']} tokens in common."
        )
    out.append("")

    e = figures["encoding"]
    out.append("## Encoding with smallm's trained tokenizer")
    out.append("")
    out.append("Identical ids from smallm, tiktoken and HF tokenizers, checked on: " + "; ".join(e["checked"]) + ".")
    out.append("")
    out.append("| case | implementation | threads | MB | best s | runs | MB/s | vs tiktoken | target |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---|")
    for case, rows in e["cases"].items():
        base = next(r for r in rows if r["implementation"].startswith("tiktoken"))
        target = TARGET_ONE_STRING if case.startswith("one string") else TARGET_BATCH
        for r in rows:
            ratio = r["mb_per_s"] / base["mb_per_s"]
            goal = ""
            if r["implementation"].startswith("smallm"):
                goal = f">= {target:g}x: {verdict(ratio, target, True)}"
            out.append(
                f"| {case} | {r['implementation']} | {r['threads']} | {r['n_bytes'] / MB:.1f} "
                f"| {r['best_s']:.3f} | {len(r['times_s'])} | {r['mb_per_s']:.1f} | {ratio:.2f}x | {goal} |"
            )
    out.append("")
    out.extend(f"Note: {n}" for n in e["notes"])
    out.append("")

    out.append("## Scaling: one pre-token of 1 MB vs 4 MB (linear => ~4x)")
    out.append("")
    small, large = SCALING_SIZES
    out.append(f"| input | implementation | {small / MB:g} MB s | {large / MB:g} MB s | ratio | same ids |")
    out.append("|---|---|---:|---:|---:|---|")
    for r in figures["scaling"]:
        same = "yes" if r["identical_ids"] else "**NO**"
        out.append(
            f"| {r['text']} | {r['implementation']} | {r['seconds'][str(small)]:.4f} | "
            f"{r['seconds'][str(large)]:.4f} | {r['ratio']:.2f}x | {same} |"
        )
    out.append("")

    out.append("## Bytes per token (smallm's tokenizer, each file one document)")
    out.append("")
    out.append("| part | MB | tokens | bytes/token |")
    out.append("|---|---:|---:|---:|")
    for name, b in figures["bytes_per_token"].items():
        out.append(f"| {name} | {b['bytes'] / MB:.2f} | {b['tokens']:,} | {b['bytes_per_token']:.3f} |")
    out.append("")
    out.append(f"Total time of this run: {figures['total_s']:.0f} s.")
    return "\n".join(out)


# ----- main -------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    smallm = import_with_retry("smallm")
    figures: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
    }
    with tempfile.TemporaryDirectory(prefix="smallm_bench_") as tmp:
        work = Path(tmp)
        corpus = find_corpus(Path(args.corpus_root), args.quick, work)
        for note in corpus.notes:
            log(note)

        # Training first, while this process is still small.
        pattern, specials = smallm.GPT4_PATTERN, list(smallm.DEFAULT_SPECIAL_TOKENS)
        results: dict[str, dict[str, Any]] = {}
        tokens: dict[str, list[bytes]] = {}
        for trainer in TRAINERS:
            result, tokens[trainer] = train_in_subprocess(trainer, corpus.files, args.vocab, pattern, specials, work)
            if trainer == "smallm" and not result.ok:
                raise SystemExit("smallm training failed; nothing to benchmark")
            results[trainer] = asdict(result)
        sm, rb = results["smallm"], results["rustbpe"]
        ok = rb["ok"]
        notes = [
            "smallm and HF count their 3 special tokens in the vocabulary; rustbpe has none, so it is asked "
            f"for {args.vocab - len(specials)} (the same number of merges).",
            "Every trainer gets the same documents (each file one document); HF and rustbpe read them from a "
            "lazy Python generator inside the timed region, smallm reads the files in Rust.",
            "Peak RSS is the child's VmHWM: interpreter + imports + training.",
        ]
        sizes = {name: r["vocab_size"] + (len(specials) if name == "rustbpe" else 0) for name, r in results.items()}
        if len({s for name, s in sizes.items() if results[name]["ok"]}) > 1:
            notes.append(f"Total vocab sizes differ (rustbpe counted with 3 specials added): {sizes}.")
        figures["training"] = {
            "vocab": args.vocab,
            "results": results,
            "targets": {
                "time_ratio": sm["wall_s"] / rb["wall_s"] if ok else float("nan"),
                "rss_ratio": sm["peak_rss_mb"] / rb["peak_rss_mb"] if ok else float("nan"),
            },
            "merge_agreement": {
                name: merge_agreement(tokens["smallm"], tokens[name]) for name in ("rustbpe", "hf") if tokens[name]
            },
            "notes": notes,
        }
        del tokens

        log("reading the corpus ...")
        file_texts = [read_text(f) for f in corpus.files]
        big = "".join(file_texts)
        lines = [line for text in file_texts for line in text.split("\n") if line]
        part_sizes = []
        k = 0
        for part in corpus.parts:
            n = sum(len(t.encode("utf-8")) for t in file_texts[k : k + len(part.files)])
            k += len(part.files)
            part_sizes.append({"name": part.name, "files": len(part.files), "mb": n / MB})
        figures["corpus"] = {
            "parts": part_sizes,
            "total_mb": len(big.encode("utf-8")) / MB,
            "lines": len(lines),
            "notes": corpus.notes,
        }
        log(f"corpus: {figures['corpus']['total_mb']:.2f} MB, {len(file_texts)} files, {len(lines):,} lines")

        enc = Encoders(work / "smallm_tokenizer")
        verified = verify_identical_ids(enc, corpus, file_texts, big, lines)
        one = bench_one_string(enc, big)
        many = bench_batch(enc, lines)
        scaling = bench_scaling(enc, file_texts)

    def encode_rows(rows: list[EncodeResult]) -> list[dict[str, Any]]:
        return [{**asdict(r), "best_s": r.best_s, "mb_per_s": r.mb_per_s} for r in rows]

    figures["encoding"] = {
        "checked": verified.checked,
        "cases": {
            "one string": encode_rows(one),
            f"{len(lines):,} lines, batched": encode_rows(many),
        },
        "notes": [
            "Times are best of 3 (2 when a run takes over 15 s), garbage collector off while timed; "
            "HF times include reading `.ids` from its Encoding objects, since the others return ids.",
            "One string: TOKENIZERS_PARALLELISM=false for HF (its single-string encode is serial anyway); "
            "RAYON_NUM_THREADS is left alone because smallm's and HF's rayon pools live in this process.",
        ],
    }
    figures["scaling"] = [{**asdict(r), "ratio": r.ratio} for r in scaling]
    figures["bytes_per_token"] = verified.bytes_per_token
    figures["total_s"] = time.perf_counter() - _T0
    figures["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return figures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="total vocabulary size (default 32000)")
    parser.add_argument(
        "--corpus-root",
        default=str(DEFAULT_CORPUS_ROOT),
        help="folder of *.txt corpora (default: ../shared/data from the repository root)",
    )
    parser.add_argument("--quick", action="store_true", help="a ~3 MB subset for a fast smoke run")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, Path(args.spec))
        return
    figures = run_benchmark(args)
    print(render_report(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        log(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
