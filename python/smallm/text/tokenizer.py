"""Byte-level BPE tokenizer: training, encoding with special tokens, and the files the ecosystem reads.

The work happens in the Rust core (``smallm._core``); this module owns the user-facing API. In a
tokenizer smallm trains, ids 0..255 are the raw bytes, merge ``i`` gets id ``256 + i`` and the special
tokens take the ids after the merges. :meth:`Tokenizer.load` also opens byte-level BPE files trained
elsewhere (GPT-2, Llama 3, Qwen2/3, SmolLM layouts), which keep their own ids, added tokens,
``ignore_merges`` and NFC normalizer, and encode to the ids the ``tokenizers`` library gives
(:attr:`Tokenizer.foreign`), and SentencePiece-style BPE files (Llama 2, TinyLlama, Mistral: byte fallback,
``▁`` for spaces; :attr:`Tokenizer.sentencepiece`), which the core runs with a BPE over characters.
Special tokens follow tiktoken's policy: :meth:`Tokenizer.encode` refuses text that contains a special
token string it was not told to allow, and :meth:`Tokenizer.encode_ordinary` treats such
strings as plain text. ``save`` writes ``tokenizer.json`` (Hugging Face ``tokenizers``) and
``tokenizer.tiktoken`` (tiktoken ranks; none for a SentencePiece-style BPE, which tiktoken cannot run);
both give the same ids as smallm (the ranks file for smallm's own layout, where an id's rank is its merge's
place; a foreign file is written back as it was).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal, Union

import numpy as np

from smallm import _core
from smallm.files.atomic import write_json_atomic, write_text_atomic
from smallm.text.corpus import Corpus
from smallm.text.roles import TOKENIZER_CONFIG_FILE, TokenRoles, read_roles
from smallm.text.training import DEFAULT_SPECIAL_TOKENS, Progress, TrainingOptions, train_on_corpus, train_on_texts

__all__ = ["TIKTOKEN_FILE", "TOKENIZER_FILE", "TOKENIZER_FILES", "Tokenizer"]

PathLike = Union[str, "os.PathLike[str]"]

TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer itself, in Hugging Face ``tokenizers``' format."""
TIKTOKEN_FILE = "tokenizer.tiktoken"
"""The same ranks for tiktoken (smallm's own layout)."""
TOKENIZER_FILES = (TOKENIZER_FILE, TIKTOKEN_FILE, TOKENIZER_CONFIG_FILE)
"""What :meth:`Tokenizer.save` writes in a folder (the last for a tokenizer trained elsewhere)."""
SpecialSet = Union[Literal["all"], Collection[str]]


class Tokenizer:
    """A trained byte-level BPE tokenizer.

    Make one with :meth:`train_from_files`, :meth:`train_from_iterator` or :meth:`load`.
    """

    def __init__(
        self,
        core: _core.Tokenizer,
        training_report: dict[str, int] | None = None,
        roles: TokenRoles | None = None,
    ) -> None:
        self._core = core
        self.training_report = training_report
        """Counts from training (vocab reached, pieces, documents, bytes); None for a loaded tokenizer."""
        self._special_ids = {s: core.special_id(s) for s in core.special_tokens}
        if roles is None:
            roles = (
                read_roles(None, self._special_ids, json.loads(core.to_json()))
                if core.foreign
                else TokenRoles.smallm(self._special_ids)
            )
        self.roles: TokenRoles = roles
        """The special tokens that start documents and end generations, and the chat template
        (:mod:`smallm.text.roles`): smallm's own for its tokenizers, the model's for an imported one."""

    # ----- training -----------------------------------------------------------------------------

    @classmethod
    def train_from_files(
        cls,
        paths: Sequence[PathLike],
        vocab_size: int,
        *,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        doc_mode: Literal["file", "line", "paragraph"] = "file",
        text_field: str = "text",
        lossy: bool = False,
        min_frequency: int = 2,
        progress: Progress = False,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Trains on corpus files, read and counted in Rust.

        Args:
            paths: UTF-8 text files (cut by ``doc_mode``) or JSON Lines files (``.jsonl``, one document
                per record, its ``text_field``), either possibly gzip-compressed (``.gz``).
            vocab_size: 256 bytes + merges + special tokens.
            pattern: ``"gpt4"``, ``"gpt2"`` or a regex for pre-tokenization.
            special_tokens: special token strings; they get the ids after the merges.
            doc_mode: what a document is: the whole ``file``, each ``line``, or each ``paragraph``.
            text_field: the field of a JSON Lines record that holds its text.
            lossy: replace invalid UTF-8 with U+FFFD instead of failing.
            min_frequency: pairs seen fewer times are not merged (training stops early instead).
            progress: True for tqdm bars, or a callable ``(stage, done, total)``.
            num_threads: threads to use (default: all cores).
        """
        corpus = Corpus(files=[Path(p) for p in paths], doc_mode=doc_mode, text_field=text_field, lossy=lossy)
        return cls.train_from_corpus(
            corpus,
            vocab_size,
            pattern=pattern,
            special_tokens=special_tokens,
            min_frequency=min_frequency,
            progress=progress,
            num_threads=num_threads,
        )

    @classmethod
    def train_from_corpus(
        cls,
        corpus: Corpus,
        vocab_size: int,
        *,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        progress: Progress = False,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Trains on a :class:`~smallm.text.corpus.Corpus`: files the core reads itself, parquet files and
        a Hugging Face dataset. Arguments as in :meth:`train_from_files`."""
        options = TrainingOptions(vocab_size, pattern, tuple(special_tokens), min_frequency, progress, num_threads)
        return cls(*train_on_corpus(corpus, options))

    @classmethod
    def train_from_iterator(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        pattern: str = "gpt4",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        batch_size: int = 4096,
        progress: Progress = False,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Trains on documents from any iterable of strings (a ``datasets`` column, a generator...).

        Documents are pulled ``batch_size`` at a time and counted in parallel in Rust.
        """
        options = TrainingOptions(vocab_size, pattern, tuple(special_tokens), min_frequency, progress, num_threads)
        return cls(*train_on_texts(texts, options, batch_size))

    # ----- files --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Loads ``path/tokenizer.json`` (or ``path`` itself when it is a file). A tokenizer trained
        elsewhere takes its roles (:attr:`roles`) from the files beside it: ``tokenizer_config.json``,
        ``chat_template.jinja``, ``generation_config.json``."""
        core = _core.Tokenizer.load(os.fspath(path))
        if not core.foreign:
            return cls(core)
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        specials = {s: core.special_id(s) for s in core.special_tokens}
        return cls(core, roles=read_roles(folder, specials, json.loads(core.to_json())))

    @classmethod
    def from_json(cls, text: str, roles: TokenRoles | None = None) -> Tokenizer:
        """The tokenizer of a ``tokenizer.json`` text (what :meth:`to_json` gives); ``roles`` as
        :meth:`load` would find them, default: smallm's, or what a foreign file's post-processor says."""
        return cls(_core.Tokenizer.from_json(text), roles=roles)

    def save(self, dir: PathLike) -> None:
        """Writes ``dir/tokenizer.json`` and ``dir/tokenizer.tiktoken`` atomically (creates ``dir``),
        and for a tokenizer trained elsewhere its roles as ``dir/tokenizer_config.json``."""
        directory = Path(dir)
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / TOKENIZER_FILE, self.to_json())
        if not self.sentencepiece:
            write_text_atomic(directory / TIKTOKEN_FILE, self._core.to_tiktoken())
        if self.foreign:
            write_json_atomic(directory / TOKENIZER_CONFIG_FILE, self.roles.to_config())

    def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """This tokenizer with ``tokens`` added as special tokens (those it lacks), on new ids after
        its last one; everything else, roles included, is kept. Used to give ChatML's markers to a base
        model's vocabulary (the model's embedding must then grow to :attr:`vocab_size`)."""
        document = json.loads(self.to_json())
        added = document.setdefault("added_tokens", [])
        next_id = self.vocab_size
        for token in tokens:
            if token in self._special_ids or any(entry.get("content") == token for entry in added):
                continue
            added.append({"id": next_id, "content": token, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True})  # fmt: skip
            next_id += 1
        return Tokenizer(_core.Tokenizer.from_json(json.dumps(document, ensure_ascii=False)), roles=self.roles)

    def to_json(self) -> str:
        """The Hugging Face ``tokenizer.json`` text."""
        return self._core.to_json()

    @property
    def core(self) -> _core.Tokenizer:
        """The Rust tokenizer this class wraps, for the other parts of the core (the shard packer)."""
        return self._core

    def __reduce__(self) -> tuple[object, tuple[str, dict[str, int] | None, TokenRoles]]:
        # Pickled by value, as tiktoken's encodings are: spawned DataLoader workers and process pools
        # rebuild it from its tokenizer.json text.
        return _unpickle, (self.to_json(), self.training_report, self.roles)

    # ----- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._core.vocab_size

    n_vocab = vocab_size

    @property
    def pattern(self) -> str:
        """The pre-tokenization regex."""
        return self._core.pattern

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""
        return dict(self._special_ids)

    @property
    def eot_token(self) -> int | None:
        """Id of ``<|endoftext|>``, if this tokenizer has it."""
        return self._special_ids.get("<|endoftext|>")

    @property
    def bos_id(self) -> int | None:
        """Id of the token that starts every document (:attr:`roles`): ``<|endoftext|>`` in smallm's
        tokenizers, the model's own (Llama 3's ``<|begin_of_text|>``) in an imported one."""
        document = self.roles.document
        return None if document is None else self._special_ids[document]

    @property
    def prompt_prefix(self) -> list[int]:
        """What a prompt starts with: ``[bos_id]`` when the tokenizer adds its BOS, else nothing."""
        return [self.bos_id] if self.roles.add_bos and self.bos_id is not None else []

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a generation (:attr:`TokenRoles.stops`)."""
        return [self._special_ids[s] for s in self.roles.stops]

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merge list, as pairs of ids: merge ``i`` joins the pair into id ``256 + i`` in smallm's
        layout, into ``merge_results[i]`` in a vocabulary trained elsewhere."""
        return self._core.merges

    @property
    def merge_results(self) -> list[int]:
        """The id each merge creates."""
        return self._core.merge_results

    @property
    def foreign(self) -> bool:
        """Whether the vocabulary was trained elsewhere (a Hugging Face ``tokenizer.json`` of GPT-2,
        Llama 3, Qwen...): its ids are the file's, and saving writes that file back as it was."""
        return self._core.foreign

    @property
    def sentencepiece(self) -> bool:
        """Whether it is a SentencePiece-style BPE trained elsewhere (Llama 2, TinyLlama, Mistral): spaces as
        ``▁``, a ``▁`` in front of each text, characters it lacks as ``<0xNN>`` byte tokens. Its ``▁`` counts
        as one byte in :meth:`token_byte_lengths` (so a text's tokens add up to one byte more than the text)."""
        return self._core.sentencepiece

    def token_bytes(self, id: int) -> bytes:
        """The bytes token ``id`` stands for (a special token: its string)."""
        try:
            return self._core.token_bytes(id)
        except OverflowError:
            raise self._unknown_id(id) from None

    def token_byte_lengths(self) -> np.ndarray:
        """Byte length of every id (0 for special tokens): the denominator of bits per byte."""
        return self._core.token_byte_lengths()

    # ----- encoding -----------------------------------------------------------------------------

    def encode_ordinary(self, text: str) -> list[int]:
        """Encodes ``text`` as plain text: special token strings in it are ordinary characters."""
        try:
            return self._core.encode_ordinary(text)
        except UnicodeEncodeError:
            return self._core.encode_ordinary(_replace_surrogates(text))

    def encode(
        self, text: str, *, allowed_special: SpecialSet = frozenset(), disallowed_special: SpecialSet = "all"
    ) -> list[int]:
        """Encodes ``text``, turning the allowed special token strings into their ids.

        A special token string in ``disallowed_special`` (by default: every special token not allowed)
        raises ``ValueError``; one in neither set is encoded as plain text.
        """
        allowed, disallowed = self._policy(allowed_special, disallowed_special)
        try:
            return self._core.encode(text, allowed, disallowed)
        except UnicodeEncodeError:
            return self._core.encode(_replace_surrogates(text), allowed, disallowed)

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        allowed_special: SpecialSet = frozenset(),
        disallowed_special: SpecialSet = "all",
        num_threads: int | None = None,
        return_numpy: bool = False,
    ) -> list[list[int]] | list[np.ndarray]:
        """Encodes many documents in parallel (the GIL is released).

        With ``return_numpy`` each document comes back as a numpy array (views into one buffer,
        uint16 when the vocabulary fits in 16 bits, else uint32), which avoids building Python ints.
        """
        allowed, disallowed = self._policy(allowed_special, disallowed_special)
        ids, offsets = self._encode_batch(texts, False, allowed, disallowed, num_threads)
        return _split(ids, offsets, return_numpy)

    def encode_ordinary_batch(
        self, texts: Sequence[str], *, num_threads: int | None = None, return_numpy: bool = False
    ) -> list[list[int]] | list[np.ndarray]:
        """:meth:`encode_batch` with special token strings treated as plain text."""
        ids, offsets = self._encode_batch(texts, True, None, None, num_threads)
        return _split(ids, offsets, return_numpy)

    def _encode_batch(
        self,
        texts: Sequence[str],
        ordinary: bool,
        allowed: list[str] | None,
        disallowed: list[str] | None,
        num_threads: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        # One joined string and the lengths cross into Rust much faster than many small strings.
        if isinstance(texts, (str, bytes)):
            raise TypeError(
                f"the batch encoders take a list of texts, not one {type(texts).__name__} (which would be encoded "
                "per character); use encode/encode_ordinary for one text, or pass [text]"
            )
        texts = texts if isinstance(texts, list) else list(texts)
        lengths = [len(t) for t in texts]
        joined = "".join(texts)
        try:
            return self._core.encode_batch(joined, lengths, ordinary, allowed, disallowed, num_threads)
        except UnicodeEncodeError:
            joined = "".join(_replace_surrogates(t) for t in texts)
            lengths = [len(_replace_surrogates(t)) for t in texts]
            return self._core.encode_batch(joined, lengths, ordinary, allowed, disallowed, num_threads)

    def _policy(self, allowed: SpecialSet, disallowed: SpecialSet) -> tuple[list[str] | None, list[str] | None]:
        for name, value in (("allowed_special", allowed), ("disallowed_special", disallowed)):
            if isinstance(value, str) and value != "all":
                raise ValueError(f'{name} must be "all" or a collection of special token strings, not {value!r}')
            if not isinstance(value, str):
                unknown = sorted(set(value) - self._special_ids.keys())
                if unknown:
                    raise ValueError(
                        f"{name} names {unknown}, which are not special tokens of this tokenizer "
                        f"(it has {sorted(self._special_ids)})"
                    )
        return (
            None if allowed == "all" else list(allowed),
            None if disallowed == "all" else list(disallowed),
        )

    # ----- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` concatenated. Unknown ids raise ``ValueError``."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        try:
            return self._core.decode_bytes(ids)
        except OverflowError:
            raise self._unknown_id(next(i for i in ids if not 0 <= i < 2**32)) from None

    def _unknown_id(self, id: int) -> ValueError:
        return ValueError(
            f"token id {id} is out of range: the vocabulary has {self.vocab_size} ids (0 to {self.vocab_size - 1})"
        )

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decodes ``ids`` to text; ``errors`` is how to treat bytes that are not valid UTF-8 (a
        token boundary can split a character), as in :meth:`bytes.decode`: ``replace``, ``strict``...
        """
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={list(self._special_ids)})"


def _unpickle(text: str, training_report: dict[str, int] | None, roles: TokenRoles | None = None) -> Tokenizer:
    return Tokenizer(_core.Tokenizer.from_json(text), training_report, roles)


def _split(ids: np.ndarray, offsets: np.ndarray, return_numpy: bool) -> list[list[int]] | list[np.ndarray]:
    if len(offsets) <= 1:
        return []
    bounds = offsets.tolist()
    if return_numpy:  # views into one buffer (np.split is several times slower for many documents)
        return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    flat = ids.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _replace_surrogates(text: str) -> str:
    """Lone surrogates cannot be UTF-8 encoded; like tiktoken, encode them as U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
