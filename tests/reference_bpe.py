"""A short, obviously-correct byte-level BPE, used only by the tests as an oracle for the Rust core.

Pre-tokenization uses Hugging Face ``tokenizers``' ``Split`` (the Oniguruma regex engine), which is
independent of smallm's hand-written matchers. Training is the textbook loop: recount every adjacent
pair at every step, merge the most frequent one (ties: the smallest ``(left, right)``), never create a
second token with bytes an existing token already has. Encoding applies the merge with the lowest
index first, leftmost among equals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex
from tokenizers.pre_tokenizers import Split


def split_pieces(pattern: str, text: str) -> list[str]:
    """The pre-tokenized pieces of ``text`` (gaps between matches are pieces of their own)."""
    return [piece for piece, _ in Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]


def train_reference(pieces: Iterable[str], n_merges: int, min_frequency: int = 1) -> list[tuple[int, int]]:
    """Up to ``n_merges`` merges learnt from ``pieces``; merge ``i`` makes id ``256 + i``."""
    words = Counter(tuple(piece.encode("utf-8")) for piece in pieces)
    token_bytes = [bytes([b]) for b in range(256)]
    banned: set[tuple[int, int]] = set()
    merges: list[tuple[int, int]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                if pair not in banned:
                    pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))
        if pairs[best] < min_frequency:
            break
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in token_bytes:
            banned.add(best)  # two ids with the same bytes cannot be written to tokenizer.json
            continue
        new_id = len(token_bytes)
        token_bytes.append(merged)
        merges.append(best)
        replaced: Counter[tuple[int, ...]] = Counter()
        for word, n in words.items():
            replaced[_replace(word, best, new_id)] += n
        words = replaced
    return merges


def _replace(word: tuple[int, ...], pair: tuple[int, int], new_id: int) -> tuple[int, ...]:
    """``word`` with every occurrence of ``pair`` replaced by ``new_id``, left to right."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def encode_reference(merges: list[tuple[int, int]], pieces: Iterable[str]) -> list[int]:
    """Ids of ``pieces``: in each, merge the pair with the lowest merge index (leftmost) until none."""
    rank = {pair: i for i, pair in enumerate(merges)}
    ids: list[int] = []
    for piece in pieces:
        word = list(piece.encode("utf-8"))
        while len(word) > 1:
            r, at = min((rank.get(p, len(rank)), i) for i, p in enumerate(zip(word, word[1:])))
            if r == len(rank):
                break
            word[at : at + 2] = [256 + r]
        ids.extend(word)
    return ids
