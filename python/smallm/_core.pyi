"""Type stubs for the Rust extension ``smallm._core`` (see rust/python.rs). Use :mod:`smallm` instead."""

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str
GPT4_PATTERN: str
GPT2_PATTERN: str
PACK_JOURNAL: str
DEDUP_KEYS_FILE: str

ProgressCallback = Callable[[str, int, int], object]

class Tokenizer:
    @staticmethod
    def load(path: str | PathLike[str]) -> Tokenizer: ...
    @staticmethod
    def from_json(text: str) -> Tokenizer: ...
    @staticmethod
    def from_merges(pattern: str, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str]) -> Tokenizer: ...
    def to_json(self) -> str: ...
    def to_tiktoken(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def n_ordinary(self) -> int: ...
    @property
    def pattern(self) -> str: ...
    @property
    def special_tokens(self) -> list[str]: ...
    @property
    def merges(self) -> list[tuple[int, int]]: ...
    @property
    def merge_results(self) -> list[int]: ...
    @property
    def foreign(self) -> bool: ...
    @property
    def sentencepiece(self) -> bool: ...
    def special_id(self, token: str) -> int | None: ...
    def encode_ordinary(self, text: str) -> list[int]: ...
    def encode(
        self, text: str, allowed_special: Sequence[str] | None, disallowed_special: Sequence[str] | None
    ) -> list[int]: ...
    def encode_batch(
        self,
        joined: str,
        char_lengths: Sequence[int],
        ordinary: bool,
        allowed_special: Sequence[str] | None,
        disallowed_special: Sequence[str] | None,
        num_threads: int | None = None,
    ) -> tuple[npt.NDArray[np.uint16] | npt.NDArray[np.uint32], npt.NDArray[np.int64]]: ...
    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...
    def encode_piece(self, piece: bytes) -> list[int]:
        """The ids of one piece as the merges leave it, with no normalisation or splitting: bytes for a
        byte-level BPE, the UTF-8 text of a word with ``▁`` for its spaces for a SentencePiece-style one."""
    def token_bytes(self, id: int) -> bytes: ...
    def token_byte_lengths(self) -> npt.NDArray[np.int64]: ...

class Trainer:
    def __init__(self, pattern: str) -> None: ...
    @staticmethod
    def for_tokenizer(tokenizer: Tokenizer) -> Trainer:
        """A trainer that counts text as ``tokenizer`` cuts it, for :meth:`extend`."""
    @property
    def unique_pieces(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...
    def add_texts(self, texts: Sequence[str], num_threads: int | None = None) -> None: ...
    def add_files(
        self,
        paths: Sequence[str | PathLike[str]],
        doc_mode: str = "file",
        text_field: str = "text",
        lossy: bool = False,
        progress: ProgressCallback | None = None,
        num_threads: int | None = None,
    ) -> None: ...
    def train(
        self,
        vocab_size: int,
        special_tokens: Sequence[str],
        min_frequency: int = 2,
        progress: ProgressCallback | None = None,
        num_threads: int | None = None,
    ) -> tuple[Tokenizer, dict[str, int]]: ...
    def extend(
        self,
        tokenizer: Tokenizer,
        new_tokens: int,
        min_frequency: int = 2,
        character_coverage: float = 0.9995,
        progress: ProgressCallback | None = None,
        num_threads: int | None = None,
    ) -> dict[str, Any]:
        """Up to ``new_tokens`` tokens learned on top of ``tokenizer`` from the counted text: ``first_id``,
        ``tokens`` (their ``tokenizer.json`` spelling, by id), ``merges`` (pairs of spellings), ``characters``
        (how many are single characters), ``chars``, ``tokens_before``, ``tokens_after``, ``documents``,
        ``unique_pieces``."""

class Packer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        dir: str | PathLike[str],
        shard_tokens: int,
        val_fraction: float,
        fingerprint: str,
        bos: str,
        clean: str | None = None,
        dedup_against: Sequence[str | PathLike[str]] = (),
        dry_run: int | None = None,
    ) -> None: ...
    @property
    def resumed_shards(self) -> tuple[int, int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def tokens_written(self) -> int: ...
    def add_texts(
        self, texts: Sequence[str], source: int, first_document: int, num_threads: int | None = None
    ) -> None: ...
    def add_files(
        self,
        paths: Sequence[str | PathLike[str]],
        first_source: int = 0,
        doc_mode: str = "file",
        text_field: str = "text",
        lossy: bool = False,
        progress: Callable[[int, int, int], object] | None = None,
        num_threads: int | None = None,
    ) -> None: ...
    def set_filter(self, name: str, judge: Callable[[list[str]], list[bool]]) -> None: ...
    def clean_report(self) -> str: ...
    def finish(self) -> dict[str, list[dict[str, int | str]]]: ...

def read_documents(
    paths: Sequence[str | PathLike[str]],
    consume: Callable[[list[str], list[int]], object],
    doc_mode: str = "file",
    text_field: str = "text",
    lossy: bool = False,
    first_source: int = 0,
) -> None:
    """Reads corpus files as the packer does and calls ``consume(docs, sources)`` with each batch of documents
    and each one's source (file index from ``first_source``), in order; an exception from it propagates."""
