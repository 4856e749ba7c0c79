"""How well a tokenizer fits a corpus: characters and bytes per token per source and per script, and how many
Hangul syllables are tokens of their own (``smallm-tokenize --report``).

Every document of the corpus (read as the packer reads it) is encoded as plain text and counted under its
source (a file, a parquet file, a dataset) and under its script: the script most of its letters belong to
(Hangul for Korean, Latin for English and most code, Han, Kana, Cyrillic; ``none`` for a document without
letters). More characters per token is cheaper text for a model: less context, compute and generation time
per sentence. A Hangul syllable (one of the 11,172 precomposed ones) counts as single when the tokenizer
encodes it alone as one token; the share is given over the syllables the corpus uses, weighted by how often
it uses them, and over all 11,172.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smallm import _core
from smallm.text.corpus import Corpus, FileGroup
from smallm.text.tokenizer import Tokenizer

__all__ = ["Counts", "TokenizerReport", "tokenizer_report"]

SCRIPTS = {
    "Hangul": re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]"),
    "Latin": re.compile("[A-Za-z\u00c0-\u024f]"),
    "Han": re.compile("[\u3400-\u4dbf\u4e00-\u9fff]"),
    "Kana": re.compile("[\u3040-\u30ff]"),
    "Cyrillic": re.compile("[\u0400-\u04ff]"),
}
SYLLABLE = re.compile("[\uac00-\ud7a3]")
ALL_SYLLABLES = 11172


@dataclass
class Counts:
    """Documents, characters, UTF-8 bytes and tokens of a part of the corpus."""

    documents: int = 0
    chars: int = 0
    bytes: int = 0
    tokens: int = 0

    def add(self, chars: int, size: int, tokens: int) -> None:
        self.documents += 1
        self.chars += chars
        self.bytes += size
        self.tokens += tokens

    @property
    def chars_per_token(self) -> float:
        return self.chars / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


@dataclass
class TokenizerReport:
    """The counts by source and by script, and the Hangul syllables the corpus uses and how many of them
    (and of their uses) are single tokens."""

    sources: dict[str, Counts] = field(default_factory=dict)
    scripts: dict[str, Counts] = field(default_factory=dict)
    syllables: Counter[str] = field(default_factory=Counter)
    single: set[str] = field(default_factory=set)
    single_of_all: int = 0

    @property
    def total(self) -> Counts:
        out = Counts()
        for c in self.sources.values():
            out.documents += c.documents
            out.chars, out.bytes, out.tokens = out.chars + c.chars, out.bytes + c.bytes, out.tokens + c.tokens
        return out

    def syllable_shares(self) -> tuple[float, float, float]:
        """Single-token shares of the distinct syllables used, of their uses, and of all 11,172."""
        used = len(self.syllables)
        uses = sum(self.syllables.values())
        single_uses = sum(n for s, n in self.syllables.items() if s in self.single)
        return (len(self.single) / max(used, 1), single_uses / max(uses, 1), self.single_of_all / ALL_SYLLABLES)

    def table(self) -> str:
        """The report as Markdown tables."""
        lines = ["| source | documents | chars/token | bytes/token | tokens |", "|---|---|---|---|---|"]
        rows = [*self.sources.items(), ("all", self.total)]
        lines += [f"| {n} | {c.documents:,} | {c.chars_per_token:.3f} | {c.bytes_per_token:.3f} | {c.tokens:,} |"
                  for n, c in rows]  # fmt: skip
        lines += ["", "| script | documents | chars/token | bytes/token | tokens |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {c.documents:,} | {c.chars_per_token:.3f} | {c.bytes_per_token:.3f} | {c.tokens:,} |"
                  for n, c in sorted(self.scripts.items(), key=lambda item: -item[1].chars)]  # fmt: skip
        if self.syllables:
            used, uses, of_all = self.syllable_shares()
            shares = (f"{100 * used:.1f}% of the {len(self.syllables):,} the corpus uses ({100 * uses:.1f}% of their "
                      f"uses), {100 * of_all:.1f}% of all {ALL_SYLLABLES:,}")  # fmt: skip
            lines += ["", f"Hangul syllables that are one token: {shares}"]
        return "\n".join(lines)


def tokenizer_report(tokenizer: Tokenizer, corpus: Corpus, *, num_threads: int | None = None) -> TokenizerReport:
    """The report of ``tokenizer`` on every document of ``corpus`` (see the module docs)."""
    report = TokenizerReport()
    names = [str(p) for p in corpus.files]

    def count(docs: Sequence[str], sources: Iterable[int | str]) -> None:
        encoded = tokenizer.encode_ordinary_batch(list(docs), return_numpy=True, num_threads=num_threads)
        for doc, source, ids in zip(docs, sources, encoded):
            name = names[source] if isinstance(source, int) else source
            size = len(doc.encode("utf-8", "surrogatepass"))
            report.sources.setdefault(name, Counts()).add(len(doc), size, len(ids))
            report.scripts.setdefault(_script(doc), Counts()).add(len(doc), size, len(ids))
            report.syllables.update(SYLLABLE.findall(doc))

    for source in corpus.sources():
        if isinstance(source, FileGroup):
            paths = [os.fspath(p) for p in source.paths]
            _core.read_documents(paths, count, corpus.doc_mode, corpus.text_field, corpus.lossy, source.first_source)
        else:
            for batch in source.batches():
                count(batch, [source.name] * len(batch))
    report.single = {s for s in report.syllables if _one_token(tokenizer, s)}
    report.single_of_all = sum(_one_token(tokenizer, chr(c)) for c in range(0xAC00, 0xAC00 + ALL_SYLLABLES))
    return report


def _script(doc: str) -> str:
    counts = {name: len(pattern.findall(doc)) for name, pattern in SCRIPTS.items()}
    best = max(counts, key=lambda name: counts[name])
    return best if counts[best] else "none"


def _one_token(tokenizer: Tokenizer, syllable: str) -> bool:
    return len(tokenizer.core.encode_piece(syllable.encode("utf-8"))) == 1
