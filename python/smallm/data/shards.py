"""The shards stage: packing a corpus into memory-mapped token shards described by a manifest.

The Rust core (``smallm._core.Packer``) encodes documents in parallel and writes the shards (the
llm.c / modded-nanogpt layout; see ``rust/pack.rs``); this module drives it over the corpus sources,
shows progress, and writes ``manifest.json``, which :mod:`smallm.data.loader` reads:

* ``format``/``format_version``; ``tokenizer`` (file name and sha256 of ``tokenizer.json`` beside it);
* ``vocab_size``, ``dtype`` (``uint16`` or ``uint32``), ``bos_id`` and ``bos_token`` (the document start:
  ``<|endoftext|>``, or an imported tokenizer's BOS) and ``special_tokens``;
* ``splits``: per split, the shards in order with their token, document and text-byte counts and the
  sha256 of their token and index files;
* ``totals`` per split (with bytes per token), the ``sources`` and the ``options`` used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smallm import __version__, _core
from smallm.data.cleaning import CleanSettings, load_filter
from smallm.files.atomic import sha256_file, write_json_atomic
from smallm.files.destination import Artifact
from smallm.text.corpus import Corpus, FileGroup
from smallm.text.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES, Tokenizer

__all__ = [
    "DEDUP_KEYS", "JOURNAL", "MANIFEST", "SHARD_FILES", "TOKENIZED", "PackOptions", "is_tokenized", "judge_corpus",
    "pack_corpus",
]  # fmt: skip

MANIFEST = "manifest.json"
FORMAT = "smallm-shards"
FORMAT_VERSION = 1
JOURNAL: str = _core.PACK_JOURNAL
"""Record of finished shards kept while packing; its presence marks an interrupted run."""
DEDUP_KEYS: str = _core.DEDUP_KEYS_FILE
"""The exact and near-duplicate keys of a run packed with ``--dedup``, for a later ``--dedup-against``."""
SHARD_FILES = (MANIFEST, JOURNAL, DEDUP_KEYS, "train_*.bin", "val_*.bin", "train_*.idx", "val_*.idx")
"""What packing writes in a shard directory, besides the tokenizer."""
MODEL_CONFIG = "config.json"
"""What a model's folder (a run, a transformers export) holds beside its tokenizer: a tokenizer next to it
is that model's, not a tokenizer folder of smallm-tokenize's."""


def is_tokenized(folder: Path) -> bool:
    """Whether ``folder`` holds what ``smallm-tokenize`` writes: shards (or a packing it was interrupted in),
    or a tokenizer of its own."""
    if any(any(folder.glob(pattern)) for pattern in SHARD_FILES):
        return True
    return (folder / TOKENIZER_FILE).is_file() and not (folder / MODEL_CONFIG).exists()


TOKENIZED = Artifact("a tokenizer and its shards", is_tokenized, (*TOKENIZER_FILES, *SHARD_FILES))
"""``smallm-tokenize``'s output as an output, for :func:`smallm.files.destination.claim`."""


@dataclass(frozen=True)
class PackOptions:
    """How documents become shards."""

    shard_tokens: int = 100_000_000
    """Most tokens per shard (a longer document gets a shard of its own)."""
    val_fraction: float = 0.005
    """Fraction of documents, chosen by a hash of their text, that go to the validation split."""
    clean: CleanSettings = field(default_factory=CleanSettings)
    """Filters and deduplication (:mod:`smallm.data.cleaning`); none by default."""

    def __post_init__(self) -> None:
        if not 1 <= self.shard_tokens <= 2**31 - 1:
            raise ValueError(f"shard size {self.shard_tokens} is out of range: it must be 1 to {2**31 - 1} tokens")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"validation fraction {self.val_fraction} is out of range: it must be in [0, 1)")


def pack_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out: Path,
    options: PackOptions = PackOptions(),
    *,
    progress: bool = True,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Encodes every document of ``corpus`` into shards in ``out``, which must already hold the
    tokenizer as ``tokenizer.json``, leaving out what ``options.clean`` removes. Resumes an interrupted
    run with the same inputs, skipping the documents of finished shards. Returns the manifest, also
    written to ``out/manifest.json`` (with ``cleaning``: per source, documents and bytes read, kept and
    removed by each rule)."""
    tokenizer_sha = sha256_file(out / TOKENIZER_FILE)
    settings = {
        "doc_mode": corpus.doc_mode,
        "text_field": corpus.text_field,
        "lossy": corpus.lossy,
        **asdict(options),
    }
    fingerprint = hashlib.sha256(
        json.dumps([tokenizer_sha, settings, corpus.describe()], sort_keys=True).encode()
    ).hexdigest()
    document = tokenizer.roles.document
    if document is None:
        raise ValueError(
            "the tokenizer has no token to start documents with (no <|endoftext|>, BOS or EOS special token); "
            "shards mark where each document starts with one"
        )
    packer = _packer(tokenizer, str(out), options, fingerprint, document, None)
    dtype, bos_id = packer.dtype, packer.bos_id
    _feed(packer, corpus, progress, num_threads)
    cleaning = json.loads(packer.clean_report())
    shards = packer.finish()
    for entry in (entry for split in shards.values() for entry in split):
        # What ShardSet.open(verify=True) checks: the token and index files as written.
        entry["sha256"] = sha256_file(out / entry["file"])
        entry["index_sha256"] = sha256_file(out / entry["index"])
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"smallm {__version__}",
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer_sha},
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "bos_id": bos_id,
        "bos_token": document,
        "special_tokens": tokenizer.special_tokens,
        "shard_tokens": options.shard_tokens,
        "splits": shards,
        "totals": {name: _totals(split) for name, split in shards.items()},
        "sources": corpus.describe(),
        "options": {**settings, "pattern": tokenizer.pattern},
    }
    if options.clean.active:
        manifest["cleaning"] = {"sources": cleaning["sources"]}
    write_json_atomic(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    return manifest


def judge_corpus(
    corpus: Corpus, clean: CleanSettings, *, samples: int = 5, progress: bool = True, num_threads: int | None = None
) -> dict[str, Any]:
    """What ``clean`` would remove from ``corpus``, with nothing encoded or written: ``{"sources": {source:
    report}, "samples": [...]}``, up to ``samples`` removed documents per rule (``--dry-run-filters``)."""
    from smallm.text.tokenizer import Tokenizer as _Tokenizer

    # The packer only judges here; its tokenizer names the document start and encodes nothing.
    marker = _Tokenizer.train_from_iterator(["x"], 257, special_tokens=["<|endoftext|>"])
    options = PackOptions(clean=clean)
    packer = _packer(marker, "", options, "judge", "<|endoftext|>", samples)
    _feed(packer, corpus, progress, num_threads)
    return json.loads(packer.clean_report())


def _packer(tokenizer: Tokenizer, out: str, options: PackOptions, fingerprint: str, document: str,
            dry_run: int | None) -> Any:  # fmt: skip
    packer = _core.Packer(
        tokenizer.core, out, options.shard_tokens, options.val_fraction, fingerprint, document,
        clean=options.clean.core_options(), dedup_against=list(options.clean.dedup_against), dry_run=dry_run,
    )  # fmt: skip
    if options.clean.python_filter is not None:
        packer.set_filter(f"filter {options.clean.python_filter}", load_filter(options.clean.python_filter))
    return packer


def _feed(packer: Any, corpus: Corpus, progress: bool, num_threads: int | None) -> None:
    """Hands every document of the corpus to the packer, with a progress bar."""
    # Parquet and datasets yield text, not file bytes, so their progress total is unknown.
    known_total = corpus.hf_dataset is None and not any(p.suffix == ".parquet" for p in corpus.files)
    total = corpus.total_file_bytes() if known_total else None
    with _PackProgress(total, packer.tokens_written, enabled=progress) as bar:
        for source in corpus.sources():
            if isinstance(source, FileGroup):
                done_before = bar.bytes_done
                packer.add_files(
                    [os.fspath(p) for p in source.paths],
                    source.first_source,
                    corpus.doc_mode,
                    corpus.text_field,
                    corpus.lossy,
                    lambda done, _total, tokens, base=done_before: bar.update(base + done, tokens),
                    num_threads,
                )
            else:
                document = 0
                for batch in source.batches():
                    packer.add_texts(batch, source.source, document, num_threads)
                    document += len(batch)
                    bar.update(bar.bytes_done, packer.tokens_written, texts=batch)


def _totals(shards: list[dict[str, int]]) -> dict[str, float]:
    tokens = sum(s["tokens"] for s in shards)
    documents = sum(s["documents"] for s in shards)
    text_bytes = sum(s["text_bytes"] for s in shards)
    # Every document adds one BOS token that stands for no text.
    content_tokens = tokens - documents
    return {
        "shards": len(shards),
        "documents": documents,
        "tokens": tokens,
        "text_bytes": text_bytes,
        "bytes_per_token": round(text_bytes / content_tokens, 4) if content_tokens else 0.0,
    }


class _PackProgress:
    """A tqdm bar over input bytes whose postfix shows tokens/s."""

    def __init__(self, total_bytes: int | None, tokens_at_start: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total_bytes
        self.bytes_done = 0
        self._start = time.perf_counter()
        self._tokens_at_start = tokens_at_start
        self._bar: Any = None

    def __enter__(self) -> _PackProgress:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total or None, desc="packing", unit="B", unit_scale=True, unit_divisor=1024)
        return self

    def update(self, bytes_done: int, tokens: int, texts: list[str] | None = None) -> None:
        if texts is not None:
            bytes_done += sum(len(t.encode("utf-8")) for t in texts)
        self.bytes_done = bytes_done
        if self._bar is not None:
            self._bar.update(max(0, bytes_done - self._bar.n))
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            rate = (tokens - self._tokens_at_start) / elapsed
            self._bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
