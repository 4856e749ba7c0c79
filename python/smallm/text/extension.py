"""Vocabulary extension: new tokens learned on a new corpus on top of an existing tokenizer, no id moved.

:func:`extend_tokenizer` counts the corpus as the tokenizer cuts it, lets the Rust core go on merging from
the tokenizer's own ids for each piece (see ``rust/extend.rs``), and returns the tokenizer with the new
tokens on the ids after its last one and the new merges after its last merge, with its roles. It works for
smallm's own tokenizers, byte-level ones trained elsewhere (Llama 3, Qwen) and SentencePiece-style ones
(Llama 2, TinyLlama, Mistral), whose missing characters get tokens first. Every existing id, token and
merge stays as it was, so a model that knows the old ids reads the old ids unchanged; the new ones are
rows its embedding must grow (:meth:`smallm.model.lm.SmallLM.grow_vocab`, from :func:`new_token_sources`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from smallm import _core
from smallm.text.corpus import Corpus
from smallm.text.tokenizer import Tokenizer
from smallm.text.training import Progress, ProgressBars, count_corpus

__all__ = ["ExtensionReport", "extend_tokenizer", "is_extension_of", "new_token_sources"]


@dataclass(frozen=True)
class ExtensionReport:
    """What an extension added and what it did to the corpus it was learned on."""

    first_id: int
    """The id of the first new token."""
    new_tokens: int
    """Tokens added: ``characters`` single characters (SentencePiece-style only), the rest merges."""
    characters: int
    chars: int
    """Characters of the corpus."""
    tokens_before: int
    """The corpus's tokens with the old tokenizer, and with the extended one."""
    tokens_after: int
    documents: int

    @property
    def chars_per_token_before(self) -> float:
        return self.chars / max(self.tokens_before, 1)

    @property
    def chars_per_token_after(self) -> float:
        return self.chars / max(self.tokens_after, 1)


def extend_tokenizer(
    tokenizer: Tokenizer,
    corpus: Corpus,
    new_tokens: int,
    *,
    min_frequency: int = 2,
    character_coverage: float = 0.9995,
    progress: Progress = False,
    num_threads: int | None = None,
) -> tuple[Tokenizer, ExtensionReport]:
    """``tokenizer`` with up to ``new_tokens`` tokens learned on ``corpus`` (fewer when no pair is seen
    ``min_frequency`` times), and the report. ``character_coverage``: for a SentencePiece-style tokenizer,
    the share of the corpus's characters its vocabulary should cover after the extension (missing
    characters get tokens, most frequent first, until it does; the rest stay byte fallback)."""
    if new_tokens < 1:
        raise ValueError(f"the number of new tokens must be at least 1, not {new_tokens}")
    if not 0.0 < character_coverage <= 1.0:
        raise ValueError(f"character_coverage must be in (0, 1], not {character_coverage}")
    trainer = _core.Trainer.for_tokenizer(tokenizer.core)
    with ProgressBars(progress) as report:
        count_corpus(trainer, corpus, report, num_threads)
        added = trainer.extend(tokenizer.core, new_tokens, min_frequency, character_coverage, report, num_threads)
    if not added["tokens"]:
        raise ValueError(
            f"nothing to add: no pair of the corpus's tokens is seen {min_frequency} times (--min-frequency) "
            "that the tokenizer does not already merge; give more text of the new domain"
        )
    document = json.loads(tokenizer.to_json())
    model = document["model"]
    vocab: dict[str, int] = model["vocab"]
    for i, token in enumerate(added["tokens"]):
        vocab[token] = added["first_id"] + i
    merges = model.get("merges") or []
    as_text = bool(merges) and isinstance(merges[0], str)
    model["merges"] = merges + [f"{a} {b}" if as_text else [a, b] for a, b in added["merges"]]
    extended = Tokenizer(_core.Tokenizer.from_json(json.dumps(document, ensure_ascii=False)), roles=tokenizer.roles)
    keys = ("first_id", "characters", "chars", "tokens_before", "tokens_after", "documents")
    return extended, ExtensionReport(new_tokens=len(added["tokens"]), **{k: added[k] for k in keys})


def is_extension_of(tokenizer: Tokenizer, base: Tokenizer) -> bool:
    """Whether ``tokenizer`` is ``base`` with tokens appended: the same split and normalisation, every token
    of ``base`` on the same id, ``base``'s merges first in the same order, and any other token on an id
    after ``base``'s last."""
    ours, theirs = json.loads(tokenizer.to_json()), json.loads(base.to_json())
    if tokenizer.vocab_size <= base.vocab_size:
        return False
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        if ours.get(key) != theirs.get(key):
            return False
    old, new = theirs["model"], ours["model"]
    if {k: v for k, v in old.items() if k not in ("vocab", "merges")} != {
        k: v for k, v in new.items() if k not in ("vocab", "merges")
    }:
        return False
    if any(new["vocab"].get(token) != i for token, i in old["vocab"].items()):
        return False
    if any(i < base.vocab_size for token, i in new["vocab"].items() if token not in old["vocab"]):
        return False
    merges = [m if isinstance(m, str) else " ".join(m) for m in new.get("merges") or []]
    if merges[: len(old.get("merges") or [])] != [m if isinstance(m, str) else " ".join(m) for m in old["merges"]]:
        return False
    added = {(t["id"], t["content"]) for t in theirs.get("added_tokens") or []}
    return added <= {(t["id"], t["content"]) for t in ours.get("added_tokens") or []}


def new_token_sources(tokenizer: Tokenizer, base: Tokenizer) -> dict[int, list[int]]:
    """For each token ``tokenizer`` (an extension of ``base``) adds, other than added special tokens: the
    ids ``base`` spells its text with, in order (a new Korean syllable of a SentencePiece-style vocabulary:
    its ``<0xNN>`` byte tokens)."""
    sources = {}
    specials = set(tokenizer.special_tokens.values())
    for i in range(base.vocab_size, tokenizer.vocab_size):
        if i in specials:
            continue
        spelled = tokenizer.token_bytes(i)
        if tokenizer.sentencepiece:
            spelled = spelled.replace(b" ", "\u2581".encode())
        sources[i] = base.core.encode_piece(spelled)
    return sources
