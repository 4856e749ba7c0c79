"""Differential tests: the saved files, read by Hugging Face ``tokenizers``, ``tiktoken`` and
``transformers``, give exactly smallm's ids, on hand-picked text, arbitrary text and real corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from sample_text import CODE, EMOJI, ENGLISH, KOREAN
from smallm import Tokenizer
from tiktoken.load import load_tiktoken_bpe

TEXTS = [
    "",
    "hello world",
    *ENGLISH,
    *KOREAN,
    *EMOJI,
    *CODE,
    "   \n\n\t  x",
    "  \t \n \r\n\r\n   \u00a0 \u3000 end   ",
    "Привет мир, 你好世界, مرحبا بالعالم, שלום, नमस्ते दुनिया, こんにちは, ภาษาไทย",
    "e\u0301 \u0915\u094d\u0937 \u1100\u1161\u11a8 \U0001f469\u200d\U0001f4bb \U0001f1f0\U0001f1f7",
    "I'LL we'VE it'S you'D they'Re '\u017f '\u212a",
    "١٢٣٤٥٦٧ \uff15\uff16\uff17\uff18 123456789 3.14159 1e-10 0x1F",
    "\x00\x01\x1f\x7f\x85\ufeff",
    "a" * 10_000,
    "가" * 3000,
    " " * 10_000 + "x",
    "\n" * 3000,
    "\t" * 500 + " " * 500 + "\r\n" * 500,
    "!!!" * 1000 + "...",
    "1234567890" * 300,
    "<|endoftext|>",
    "before<|endoftext|>after",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n안녕<|im_end|>",
    "<|endoftext|><|endoftext|> <|im_end|>\n\n<|im_start|>",
    "<|im_start <|endoftext| |im_end|>",
]


def split_pattern(tokenizer_json: dict) -> str:
    steps = tokenizer_json["pre_tokenizer"]["pretokenizers"]
    assert steps[0]["type"] == "Split"
    return steps[0]["pattern"]["Regex"]


def tiktoken_encoding(directory: Path) -> tiktoken.Encoding:
    """A tiktoken Encoding made only from what ``save`` wrote: ranks, pattern and specials."""
    doc = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    return tiktoken.Encoding(
        name="smallm-test",
        pat_str=split_pattern(doc),
        mergeable_ranks=load_tiktoken_bpe(str(directory / "tokenizer.tiktoken")),
        special_tokens={t["content"]: t["id"] for t in doc["added_tokens"]},
    )


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def tt(tok_dir: Path) -> tiktoken.Encoding:
    return tiktoken_encoding(tok_dir)


@pytest.fixture(scope="module")
def fast(tok_dir: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"))


def test_pattern_and_specials_are_recoverable_from_the_files(tok: Tokenizer, tok_dir: Path) -> None:
    doc = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert split_pattern(doc) == tok.pattern
    assert {t["content"]: t["id"] for t in doc["added_tokens"]} == tok.special_tokens
    assert all(t["special"] for t in doc["added_tokens"])
    ranks = load_tiktoken_bpe(str(tok_dir / "tokenizer.tiktoken"))
    assert ranks == {tok.token_bytes(i): i for i in range(256 + len(tok.merges))}


@pytest.mark.parametrize("text", TEXTS)
def test_ids_identical_to_hf_tokenizers(tok: Tokenizer, hf: tokenizers.Tokenizer, text: str) -> None:
    # Hugging Face always splits out the special tokens: compare with all of them allowed.
    ids = tok.encode(text, allowed_special="all")
    assert hf.encode(text).ids == ids
    assert hf.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_identical_to_tiktoken(tok: Tokenizer, tt: tiktoken.Encoding, text: str) -> None:
    assert tt.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert tt.encode_ordinary(text) == tok.encode_ordinary(text)
    assert tt.encode(text, disallowed_special=()) == tok.encode(text, disallowed_special=())
    assert tt.decode(tok.encode(text, allowed_special="all")) == text


def test_tiktoken_and_smallm_refuse_the_same_special_strings(tok: Tokenizer, tt: tiktoken.Encoding) -> None:
    for text in TEXTS:
        refused_by_tiktoken = refused_by_smallm = False
        try:
            tt.encode(text)
        except ValueError:
            refused_by_tiktoken = True
        try:
            tok.encode(text)
        except ValueError:
            refused_by_smallm = True
        assert refused_by_tiktoken == refused_by_smallm, text


@pytest.mark.parametrize("text", TEXTS)
def test_ids_identical_to_transformers_fast(tok: Tokenizer, fast, text: str) -> None:
    ids = tok.encode(text, allowed_special="all")
    assert fast.encode(text, add_special_tokens=False) == ids
    assert fast.decode(ids, clean_up_tokenization_spaces=False) == text


def test_batches_identical_to_hf_and_tiktoken(
    tok: Tokenizer, hf: tokenizers.Tokenizer, tt: tiktoken.Encoding, corpus_docs: list[str]
) -> None:
    docs = [*corpus_docs, *TEXTS]
    ours = tok.encode_batch(docs, allowed_special="all")
    assert [e.ids for e in hf.encode_batch(docs)] == ours
    assert tt.encode_batch(docs, allowed_special="all") == ours
    assert tt.encode_ordinary_batch(docs) == tok.encode_ordinary_batch(docs)


@given(st.text())
def test_arbitrary_text_gives_the_same_ids_everywhere(
    tok: Tokenizer, hf: tokenizers.Tokenizer, tt: tiktoken.Encoding, fast, text: str
) -> None:
    ids = tok.encode(text, allowed_special="all")
    assert hf.encode(text).ids == ids
    assert tt.encode(text, allowed_special="all") == ids
    assert fast.encode(text, add_special_tokens=False) == ids
    assert tt.encode_ordinary(text) == tok.encode_ordinary(text)


# Characters where pre-tokenizers tend to disagree: contractions and their case folds, every kind
# of whitespace and line break, letters and digits of several scripts, marks, emoji and ZWJ.
TRICKY = st.text(
    st.one_of(
        st.sampled_from(list("'sStTdDmMlLvVrReE \t\n\r\x0b\x0c\x85\u00a0\u1680\u2028\u3000\u017f\u212a")),
        st.sampled_from(list("aZ\u00e9\u0301\u0663\uff15\u00b2\u2167\uac00\u3131\u4e00!?.,-_#\U0001f642\u200d")),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=40,
)


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def trio(request, corpus_docs: list[str], tmp_path_factory: pytest.TempPathFactory):
    """(smallm, HF tokenizers, tiktoken) for a tokenizer with each built-in pattern."""
    t = Tokenizer.train_from_iterator(corpus_docs, 900, pattern=request.param)
    out = tmp_path_factory.mktemp(request.param)
    t.save(out)
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    hf.encode_special_tokens = True  # compared with encode_ordinary: special-token strings are plain text
    return t, hf, tiktoken_encoding(out)


@given(TRICKY)
def test_tricky_text_gives_the_same_ids_for_both_builtin_patterns(trio, text: str) -> None:
    t, hf, tt = trio
    ids = t.encode_ordinary(text)
    assert hf.encode(text).ids == ids
    assert tt.encode_ordinary(text) == ids
    assert t.decode(ids) == text


@given(st.lists(st.sampled_from([*TEXTS[:40], "<|endoftext|>", "<|im_start|>", " ", "\n"]), max_size=8))
def test_concatenations_of_tricky_text_give_the_same_ids(
    tok: Tokenizer, hf: tokenizers.Tokenizer, tt: tiktoken.Encoding, parts: list[str]
) -> None:
    text = "".join(parts)
    ids = tok.encode(text, allowed_special="all")
    assert hf.encode(text).ids == ids
    assert tt.encode(text, allowed_special="all") == ids


@pytest.mark.parametrize("pattern", ["gpt2", r"\S+|\s+", r"\p{L}+|\p{N}"])
def test_other_patterns_agree_with_hf_and_tiktoken(corpus_docs: list[str], tmp_path: Path, pattern: str) -> None:
    t = Tokenizer.train_from_iterator(corpus_docs, 700, pattern=pattern)
    t.save(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tt = tiktoken_encoding(tmp_path)
    for text in TEXTS:
        ids = t.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids, text
        assert t.decode(ids) == text
        if pattern != r"\p{L}+|\p{N}":  # tiktoken drops the text between matches; smallm and HF keep it
            assert tt.encode(text, allowed_special="all") == ids, text


# ----- the shared real corpora ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_corpus(shared_data: Path) -> tuple[list[str], str, list[str]]:
    """(training documents, held-out English, held-out Korean reviews), about 3.4 MB to train on."""
    english = (shared_data / "tinyshakespeare.txt").read_bytes().decode("utf-8")
    with open(shared_data / "nsmc_reviews_ko.txt", "rb") as f:
        korean = f.read(2_400_000).decode("utf-8", errors="ignore").split("\n")[:-1]
    cut = len(korean) * 5 // 6
    train = [*english[:900_000].split("\n\n"), *korean[:cut]]
    return train, english[900_000:], korean[cut:]


@pytest.fixture(scope="module")
def real_tok(real_corpus: tuple[list[str], str, list[str]], tmp_path_factory: pytest.TempPathFactory):
    tok = Tokenizer.train_from_iterator(real_corpus[0], 4000)
    out = tmp_path_factory.mktemp("real")
    tok.save(out)
    return tok, out


def test_real_corpora_give_identical_ids_in_hf_and_tiktoken(real_corpus, real_tok) -> None:
    _, english, korean = real_corpus
    tok, out = real_tok
    assert tok.vocab_size == 4000
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    tt = tiktoken_encoding(out)
    held_out_korean = "\n".join(korean)
    for text in (english, held_out_korean):
        ids = tok.encode_ordinary(text)
        assert len(ids) < len(text.encode("utf-8")) / 2.5
        assert tt.encode_ordinary(text) == ids
        assert hf.encode(text).ids == ids
        assert tok.decode(ids, errors="strict") == text


def test_real_corpora_batches_identical_to_hf_batches(real_corpus, real_tok) -> None:
    _, english, korean = real_corpus
    tok, out = real_tok
    hf = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    tt = tiktoken_encoding(out)
    docs = [*english.split("\n\n"), *korean]
    ours = tok.encode_batch(docs)
    assert [e.ids for e in hf.encode_batch(docs)] == ours
    assert tt.encode_ordinary_batch(docs) == ours
    arrays = tok.encode_ordinary_batch(docs, return_numpy=True, num_threads=2)
    assert [a.tolist() for a in arrays] == ours
