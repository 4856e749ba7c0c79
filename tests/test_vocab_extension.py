"""Vocabulary extension (``smallm-tokenize --tokenizer RUN --extend N``): tokens learned on a Korean corpus on
top of an English tokenizer, for smallm's own, byte-level ones trained elsewhere (GPT-2, Llama 3, Qwen and
SmolLM layouts) and SentencePiece-style ones. Every old id, token and merge stays; the extended file encodes
to ``tokenizers``' ids; the reported token counts are the real ones; the command writes tokenizer and shards."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.text.corpus import Corpus
from smallm.text.extension import extend_tokenizer, is_extension_of, new_token_sources

tokenizers = pytest.importorskip("tokenizers")
from test_foreign_tokenizers import FAMILIES  # noqa: E402
from test_sentencepiece import LAYOUTS, sentencepiece_style  # noqa: E402

SYLLABLES = "가나다라마바사아자차카타파하고노도로모보소오조호영화정말재밌어요배우연기음악좋았다시간낭비한국어맑은날씨"
RARE = "갉갊갋갌갍갎갏걁걂걃걄걅걆걇걈걉"


def korean_corpus(n: int, seed: int) -> list[str]:
    """``n`` lines of Korean-looking text over a few hundred words (and a few rare syllables, once each)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".!? ") for _ in range(n)]
    return [*lines, *(f"{c} 희귀" for c in RARE)]


TRAIN, HELD_OUT = korean_corpus(1500, 0), korean_corpus(300, 1)
TEXTS = [*HELD_OUT[:100], *KOREAN, *ENGLISH, *EMOJI, *CODE, "", " ", "  x  ", "한국어 🙂 English"]


def corpus_of(lines: list[str], folder: Path) -> Corpus:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ko.txt").write_text("\n".join(lines), encoding="utf-8")
    return Corpus(files=[folder / "ko.txt"], doc_mode="line")


def bases(tmp: Path) -> dict[str, Tokenizer]:
    """English-only tokenizers of every kind."""
    out = {"smallm": Tokenizer.train_from_iterator([*ENGLISH, *CODE] * 20, 600)}
    for name, make in FAMILIES.items():
        (tmp / name).mkdir()
        (tmp / name / "tokenizer.json").write_text(json.dumps(make()), encoding="utf-8")
        out[name] = Tokenizer.load(tmp / name)
    for layout in LAYOUTS:
        (tmp / layout).mkdir()
        (tmp / layout / "tokenizer.json").write_text(json.dumps(sentencepiece_style(layout)), encoding="utf-8")
        out[f"sp-{layout}"] = Tokenizer.load(tmp / layout)
    return out


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, Tokenizer, object]]:
    """Per kind: the base, its extension by 200 tokens on the Korean corpus, and the report."""
    tmp = tmp_path_factory.mktemp("bases")
    corpus = corpus_of(TRAIN, tmp / "corpus")
    return {name: (base, *extend_tokenizer(base, corpus, 200)) for name, base in bases(tmp).items()}


def test_every_old_id_token_and_merge_is_kept(extended: dict) -> None:
    for name, (base, ext, report) in extended.items():
        old, new = json.loads(base.to_json())["model"], json.loads(ext.to_json())["model"]
        assert all(new["vocab"][t] == i for t, i in old["vocab"].items()), name
        assert new["merges"][: len(old["merges"])] == old["merges"], name
        assert ext.special_tokens == base.special_tokens and ext.roles == base.roles, name
        assert report.first_id == base.vocab_size and ext.vocab_size == base.vocab_size + report.new_tokens, name
        assert report.new_tokens == 200 and is_extension_of(ext, base) and not is_extension_of(base, ext), name
        assert ext.sentencepiece == base.sentencepiece and ext.pattern == base.pattern, name
        for text in TEXTS:  # the new tokens only join what the old ones spelled
            assert ext.decode(ext.encode_ordinary(text)) == base.decode(base.encode_ordinary(text)), (name, text)


def test_the_extension_encodes_to_tokenizers_ids(extended: dict) -> None:
    for name, (_, ext, _) in extended.items():
        theirs = tokenizers.Tokenizer.from_str(ext.to_json())
        for text in TEXTS:
            assert ext.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False).ids, (name, text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*SYLLABLES, *RARE, " ", "a", "ㅋ", "!", "\n", "🙂", "é"]), max_size=30))
def test_random_text_encodes_to_tokenizers_ids(extended: dict, chars: list[str]) -> None:
    text = "".join(chars)
    for name in ("smallm", "qwen", "sp-llama2", "sp-split"):
        ext = extended[name][1]
        theirs = tokenizers.Tokenizer.from_str(ext.to_json())
        assert ext.encode_ordinary(text) == theirs.encode(text, add_special_tokens=False).ids, (name, text)


def test_the_report_counts_the_corpus_tokens_before_and_after(extended: dict) -> None:
    chars = sum(len(line) for line in TRAIN)
    for name, (base, ext, report) in extended.items():
        assert report.chars == chars and report.documents == len(TRAIN), name
        if name == "sp-spanning":  # counted per word, while its encoder merges across words: close, not equal
            continue
        assert report.tokens_before == sum(len(base.encode_ordinary(x)) for x in TRAIN), name
        assert report.tokens_after == sum(len(ext.encode_ordinary(x)) for x in TRAIN), name
        held = sum(map(len, HELD_OUT))
        before = held / sum(len(base.encode_ordinary(x)) for x in HELD_OUT)
        after = held / sum(len(ext.encode_ordinary(x)) for x in HELD_OUT)
        assert after > 1.5 * before, (name, before, after)  # held-out Korean costs far fewer tokens


def test_a_sentencepiece_vocabulary_gets_its_missing_characters_first(extended: dict) -> None:
    base, ext, report = extended["sp-llama2"]
    frequent = [c for c in dict.fromkeys(SYLLABLES) if len(base.encode_ordinary(c)) > 2]  # byte fallback now
    assert report.characters >= len(frequent) and report.characters < 200
    for c in frequent:
        assert len(ext.encode_ordinary(c)) <= 2, c  # "▁" and the character's own token, or one for both
    assert all(len(ext.encode_ordinary(c)) > 2 for c in RARE)  # seen once: still bytes
    sources = new_token_sources(ext, base)
    assert sources[report.first_id] == base.core.encode_piece(ext.token_bytes(report.first_id))
    assert all(len(s) == 3 and 3 <= min(s) <= 258 for i, s in sources.items() if i < base.vocab_size + 10)


def test_new_token_sources_spell_each_new_token_with_old_ids(extended: dict) -> None:
    for name, (base, ext, _) in extended.items():
        sources = new_token_sources(ext, base)
        assert sorted(sources) == list(range(base.vocab_size, ext.vocab_size)), name
        for i, parts in sources.items():
            assert all(p < base.vocab_size for p in parts) and len(parts) >= 1, name
            assert base.decode_bytes(parts) == ext.decode_bytes([i]) or ext.sentencepiece, name


def test_fewer_pairs_than_asked_stop_early_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    base = Tokenizer.train_from_iterator(ENGLISH * 10, 400)
    ext, report = extend_tokenizer(base, corpus_of(["가나 가나 다라"] * 3, tmp_path), 50)
    assert report.new_tokens == ext.vocab_size - base.vocab_size < 50
    with pytest.raises(ValueError, match="nothing to add: no pair of the corpus's tokens is seen 2 times"):
        extend_tokenizer(base, corpus_of(["갉걁"], tmp_path), 5)
    with pytest.raises(ValueError, match="at least 1"):
        extend_tokenizer(base, corpus_of(["가나"], tmp_path), 0)
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="the corpus is empty"):
        extend_tokenizer(base, Corpus(files=[tmp_path / "empty.txt"], doc_mode="line"), 5)


# ----- the command ----------------------------------------------------------------------------------------


def test_tokenize_extend_writes_the_extended_tokenizer_and_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import tokenize as tokenize_cli
    from smallm.data.shardset import ShardSet

    (tmp_path / "en.txt").write_text("\n".join([*ENGLISH, *CODE] * 20), encoding="utf-8")
    (tmp_path / "ko.txt").write_text("\n".join(TRAIN), encoding="utf-8")
    assert tokenize_cli.main([str(tmp_path / "en.txt"), "--vocab", "600", "--out", str(tmp_path / "en"), "--quiet",
                              "--doc-mode", "line"]) == 0  # fmt: skip
    argv = [str(tmp_path / "ko.txt"), "--doc-mode", "line", "--tokenizer", str(tmp_path / "en"), "--extend", "300",
            "--out", str(tmp_path / "ko"), "--quiet"]  # fmt: skip
    assert tokenize_cli.main(argv) == 0
    err = capsys.readouterr().err
    base, ext = Tokenizer.load(tmp_path / "en"), Tokenizer.load(tmp_path / "ko")
    assert is_extension_of(ext, base) and ext.vocab_size == base.vocab_size + 300
    ids = f"{base.vocab_size}-{base.vocab_size + 299}"
    assert re.search(rf"by 300 tokens \(300 merges\) on ids {ids}; characters per token on this corpus: "
                     r"0\.\d+ before, [1-9]\.\d+ after", err), err  # fmt: skip
    shards = ShardSet.open(tmp_path / "ko", "train")
    assert int(shards.shards[0].tokens.int().max()) >= base.vocab_size  # the new ids are in the shards
    assert tokenize_cli.main(argv) == 1  # the rule of destinations: not again without --force
    assert "--force" in capsys.readouterr().err
    assert tokenize_cli.main([*argv, "--force"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--extend", "10"], "--extend adds tokens to a tokenizer: name it with --tokenizer"),
        (["--extend", "0", "--tokenizer", "TOK"], "--extend must be at least 1"),
        (["--extend", "5", "--tokenizer", "OUT"], "give an --out other than --tokenizer"),
    ],
)
def test_tokenize_extend_refuses_bad_options(
    extra: list[str], message: str, tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    from smallm.cli import tokenize as tokenize_cli

    (tmp_path / "ko.txt").write_text("\n".join(TRAIN[:50]), encoding="utf-8")
    extra = [str(tok_dir) if a == "TOK" else str(tmp_path / "out") if a == "OUT" else a for a in extra]
    assert tokenize_cli.main([str(tmp_path / "ko.txt"), "--out", str(tmp_path / "out"), *extra]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or extra[-1] == str(tmp_path / "out")
