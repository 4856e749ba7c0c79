"""Reading token shards: the manifest, the token files and their document indexes, checked and mapped.

Reads the shard directory that the packer (:mod:`smallm.data.shards`, ``rust/pack.rs``) writes
(``smallm-shards`` format version 1):

* ``manifest.json``: the tokenizer file and its sha256, ``vocab_size``, the token ``dtype``, the BOS id
  (of the document-start token: ``<|endoftext|>``, or an imported model's BOS) and, per split, the shards
  with their token and document counts.
* ``<split>_NNNNNN.bin``: the llm.c / modded-nanogpt token file: a header of 256 little-endian int32
  (magic 20240520; version 1 = uint16 tokens, 2 = uint32 tokens; token count n), then n tokens.
* ``<split>_NNNNNN.idx``: a header of 4 little-endian int64 (magic 20240521, version 1, documents d,
  tokens n), then d strictly increasing document start offsets, the first 0. Every document starts
  with the BOS id and ends where the next one starts; documents never span shards.

:class:`ShardSet` checks all of this and maps every shard with ``np.memmap`` (copy-on-write, so torch
accepts it; nothing is ever written): its tensors are views of the files, never copies. Every problem
is a :class:`ShardError` naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from smallm.data.shards import MANIFEST
from smallm.errors import SmallmError
from smallm.files.atomic import sha256_file

__all__ = ["Shard", "ShardError", "ShardSet"]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT, FORMAT_VERSION = "smallm-shards", 1
TOKENS_MAGIC, INDEX_MAGIC, INDEX_VERSION = 20240520, 20240521, 1
TOKENS_HEADER_BYTES, INDEX_HEADER_BYTES = 256 * 4, 4 * 8
TOKEN_VERSIONS = {"uint16": 1, "uint32": 2}  # manifest dtype -> .bin header version
TOKEN_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


class ShardError(SmallmError, ValueError):
    """A shard directory that does not follow the format; the message names the file at fault."""


# ----- the shard directory -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One token file and its document index, both memory-mapped."""

    path: Path
    """The ``.bin`` token file."""
    index_path: Path
    """The ``.idx`` document index."""
    array: np.ndarray
    """The tokens (uint16 or uint32), a copy-on-write map of ``path``."""
    tokens: torch.Tensor
    """``array`` as a 1-D torch tensor: the same memory, not a copy."""
    doc_starts: np.ndarray
    """Document start offsets (int64), a map of ``index_path``."""

    @property
    def num_tokens(self) -> int:
        return len(self.array)

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts)


class ShardSet:
    """The checked, memory-mapped shards of one split of a shard directory; make it with :meth:`open`."""

    def __init__(self, directory: Path, split: str, manifest: dict[str, Any], shards: list[Shard]) -> None:
        self.directory = directory
        self.split = split
        self.manifest = manifest
        self.shards = shards
        self.vocab_size: int = manifest["vocab_size"]
        self.bos_id: int = manifest["bos_id"]

    @classmethod
    def open(cls, directory: PathLike, split: str = "train", *, verify: bool = True) -> ShardSet:
        """Reads ``directory/manifest.json`` and maps the shards of ``split``.

        Always checks the manifest, the tokenizer's sha256, and every header, file size and count
        against each other and the manifest. ``verify`` also reads every file once: its sha256
        against the manifest's (shards packed before the manifest had them are not hashed), ids below
        ``vocab_size`` and a BOS at every document start. Raises :class:`ShardError` naming the file.
        """
        directory = Path(directory)
        manifest_path = directory / MANIFEST
        manifest = _read_manifest(manifest_path)
        _check_tokenizer(directory, manifest_path, manifest["tokenizer"])
        if split not in manifest["splits"]:
            raise ShardError(f"{manifest_path}: no split {split!r} (it has {sorted(manifest['splits'])})")
        version = TOKEN_VERSIONS[manifest["dtype"]]
        shards = []
        for i, entry in enumerate(manifest["splits"][split]):
            try:
                file, index, tokens, documents = (entry[k] for k in ("file", "index", "tokens", "documents"))
            except (KeyError, TypeError) as e:
                raise ShardError(f"{manifest_path}: {split} shard {i} lacks {e}") from e
            shard = _open_shard(directory / file, directory / index, version, tokens, documents)
            if verify:
                for path, key in ((shard.path, "sha256"), (shard.index_path, "index_sha256")):
                    _verify_digest(path, entry.get(key), manifest_path)
                _verify_tokens(shard, manifest["vocab_size"], manifest["bos_id"])
            shards.append(shard)
        return cls(directory, split, manifest, shards)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Pickled as where it is, not as its tokens: a DataLoader worker (spawn) maps the same files again
        # (checked as always, not read through again), so a large shard set costs a few bytes to send.
        return _reopen, (os.fspath(self.directory), self.split)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.num_documents for s in self.shards)

    def __repr__(self) -> str:
        return (
            f"ShardSet({str(self.directory)!r}, split={self.split!r}, shards={len(self.shards)}, "
            f"tokens={self.num_tokens}, documents={self.num_documents})"
        )


def _reopen(directory: str, split: str) -> ShardSet:
    return ShardSet.open(directory, split, verify=False)


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ShardError(f"{path}: missing (not a shard directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: expected a JSON object")
    found = (manifest.get("format"), manifest.get("format_version"))
    if found != (FORMAT, FORMAT_VERSION):
        raise ShardError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, found {found}")
    missing = [k for k in ("tokenizer", "vocab_size", "dtype", "bos_id", "splits") if k not in manifest]
    if missing:
        raise ShardError(f"{path}: missing fields {missing}")
    if not all(type(manifest[k]) is int for k in ("vocab_size", "bos_id")):
        raise ShardError(f"{path}: vocab_size and bos_id must be integers")
    if not 0 <= manifest["bos_id"] < manifest["vocab_size"]:
        raise ShardError(f"{path}: bos_id {manifest['bos_id']} is not below vocab_size {manifest['vocab_size']}")
    if manifest["dtype"] not in TOKEN_VERSIONS:
        raise ShardError(f"{path}: dtype {manifest['dtype']!r} is not one of {sorted(TOKEN_VERSIONS)}")
    return manifest


def _check_tokenizer(directory: Path, manifest_path: Path, entry: dict[str, str]) -> None:
    try:
        path, expected = directory / entry["file"], entry["sha256"].lower()
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{manifest_path}: the tokenizer entry needs a file and a sha256: {e!r}") from e
    if not path.is_file():
        raise ShardError(f"{path}: missing (the tokenizer named in {manifest_path})")
    digest = sha256_file(path)
    if digest != expected:
        raise ShardError(
            f"{path}: sha256 {digest} does not match {expected} in {manifest_path}: "
            "the shards were made with another tokenizer"
        )


def _read_header(path: Path, size: int, dtype: str) -> np.ndarray:
    if not path.is_file():
        raise ShardError(f"{path}: missing (listed in manifest.json)")
    found = path.stat().st_size
    if found < size:
        raise ShardError(f"{path}: {found} bytes, shorter than its {size}-byte header")
    return np.fromfile(path, dtype=dtype, count=size // np.dtype(dtype).itemsize)


def _check_size(path: Path, expected: int, what: str) -> None:
    found = path.stat().st_size
    if found != expected:
        raise ShardError(f"{path}: file size {found} bytes, but {what} make {expected} bytes")


def _map(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(count,))


def _open_shard(path: Path, index_path: Path, version: int, tokens: int, documents: int) -> Shard:
    magic, found_version, n = (int(v) for v in _read_header(path, TOKENS_HEADER_BYTES, "<i4")[:3])
    if magic != TOKENS_MAGIC:
        raise ShardError(f"{path}: bad magic: expected {TOKENS_MAGIC}, found {magic}")
    if found_version != version:
        raise ShardError(f"{path}: bad version: expected {version} (manifest.json), found {found_version}")
    dtype = TOKEN_DTYPES[version]
    _check_size(path, TOKENS_HEADER_BYTES + n * dtype.itemsize, f"the header's {n} tokens")
    if n != tokens:
        raise ShardError(f"{path}: header says {n} tokens, manifest.json says {tokens}")

    magic, found_version, d, index_n = (int(v) for v in _read_header(index_path, INDEX_HEADER_BYTES, "<i8"))
    if magic != INDEX_MAGIC:
        raise ShardError(f"{index_path}: bad magic: expected {INDEX_MAGIC}, found {magic}")
    if found_version != INDEX_VERSION:
        raise ShardError(f"{index_path}: bad version: expected {INDEX_VERSION}, found {found_version}")
    if index_n != n:
        raise ShardError(f"{index_path}: header says {index_n} tokens, {path.name} has {n}")
    if d != documents:
        raise ShardError(f"{index_path}: header says {d} documents, manifest.json says {documents}")
    _check_size(index_path, INDEX_HEADER_BYTES + 8 * d, f"the header's {d} documents")
    starts = _map(index_path, np.dtype("<i8"), INDEX_HEADER_BYTES, d)
    if d == 0 and n > 0:
        raise ShardError(f"{index_path}: no documents, but {path.name} has {n} tokens")
    if d > 0:
        if starts[0] != 0:
            raise ShardError(f"{index_path}: the first document starts at {starts[0]}, not 0")
        steps = np.diff(starts)
        if len(steps) and steps.min() <= 0:
            i = int(np.argmax(steps <= 0))
            raise ShardError(
                f"{index_path}: offsets not strictly increasing: document {i} at {starts[i]}, "
                f"document {i + 1} at {starts[i + 1]}"
            )
        if starts[-1] >= n:
            raise ShardError(f"{index_path}: the last document starts at {starts[-1]}, past {n} tokens")
    array = _map(path, dtype, TOKENS_HEADER_BYTES, n)
    return Shard(path, index_path, array, torch.from_numpy(array), starts)


def _verify_digest(path: Path, expected: str | None, manifest_path: Path) -> None:
    if expected is None:
        return
    digest = sha256_file(path)
    if digest != expected:
        raise ShardError(
            f"{path}: sha256 {digest} does not match {expected} in {manifest_path}: the file changed after "
            "it was packed (a disk error, or an edit); pack the corpus again (smallm-tokenize ... --force)"
        )


def _verify_tokens(shard: Shard, vocab_size: int, bos_id: int) -> None:
    if shard.num_tokens == 0:
        return
    top = int(shard.array.max())
    if top >= vocab_size:
        at = int(np.argmax(shard.array >= vocab_size))
        raise ShardError(
            f"{shard.path}: token id {top} >= vocab_size {vocab_size} (first out-of-range id at token {at})"
        )
    firsts = shard.array[shard.doc_starts]
    if not np.all(firsts == bos_id):
        i = int(np.argmax(firsts != bos_id))
        raise ShardError(
            f"{shard.index_path}: document {i} starts at token {shard.doc_starts[i]} of {shard.path.name}, "
            f"whose id {firsts[i]} is not the BOS id {bos_id}"
        )


# ----- samplers: fill the rows of one batch, (B, T+1) int64, and say where they are ----------------
