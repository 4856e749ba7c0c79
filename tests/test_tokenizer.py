"""Encoding and decoding: round trips, the special-token policy, batches, linear time on long
pieces, byte-level decoding, and the files a tokenizer is saved to."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sample_text import CODE, EMOJI, KOREAN
from smallm import Tokenizer

EDGE_CASES = [
    "",
    " ",
    "a",
    "   \n\n\t  x",
    "line one\r\nline two\r\n\r\n",
    "\x00\x01\x1f\x7f",
    "\u00a0\u2028\u3000\ufeff",
    "e\u0301 \u0915\u094d\u0937 \U0001f469\u200d\U0001f4bb",
    "I'LL we'VE it'S '\u017f",
    "<|endoftext|",
    " " * 5000,
]


@given(st.text())
def test_roundtrip_on_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode_ordinary(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    special_ids = tok.encode(text, allowed_special="all")
    assert tok.decode(special_ids, errors="strict") == text


@pytest.mark.parametrize("text", EDGE_CASES + KOREAN + EMOJI + CODE)
def test_roundtrip_on_edge_cases(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode_ordinary(text), errors="strict") == text


def test_roundtrip_on_the_training_corpus(tok: Tokenizer, corpus_docs: list[str]) -> None:
    for doc in corpus_docs:
        ids = tok.encode(doc)
        assert tok.decode(ids, errors="strict") == doc
        assert all(0 <= i < tok.vocab_size - len(tok.special_tokens) for i in ids)


def test_encoding_compresses_text_it_was_trained_on(tok: Tokenizer, corpus_docs: list[str]) -> None:
    n_bytes = sum(len(d.encode("utf-8")) for d in corpus_docs)
    n_ids = sum(len(tok.encode_ordinary(d)) for d in corpus_docs)
    assert n_bytes / n_ids > 2.5


# ----- special tokens --------------------------------------------------------------------------


CHAT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|><|endoftext|>"


def test_special_token_in_text_is_refused_by_default(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"<\|endoftext\|>.*allowed_special") as info:
        tok.encode("some text <|endoftext|> more")
    assert "encode_ordinary" in str(info.value)
    with pytest.raises(ValueError, match="im_start"):
        tok.encode_batch(["fine", CHAT])


def test_allowed_special_tokens_become_their_ids(tok: Tokenizer) -> None:
    ids = tok.encode(CHAT, allowed_special="all")
    sp = tok.special_tokens
    assert [i for i in ids if i >= 256 + len(tok.merges)] == [
        sp["<|im_start|>"],
        sp["<|im_end|>"],
        sp["<|im_start|>"],
        sp["<|im_end|>"],
        sp["<|endoftext|>"],
    ]
    assert ids[0] == sp["<|im_start|>"] and ids[-1] == tok.eot_token
    assert ids == tok.encode(CHAT, allowed_special=set(sp))
    assert tok.decode(ids) == CHAT


def test_allowed_subset_refuses_the_others(tok: Tokenizer) -> None:
    chat_turn = CHAT.replace("<|endoftext|>", "")
    ids = tok.encode(chat_turn, allowed_special={"<|im_start|>", "<|im_end|>"})
    assert tok.decode(ids) == chat_turn
    with pytest.raises(ValueError, match="endoftext"):
        tok.encode(CHAT, allowed_special={"<|im_start|>", "<|im_end|>"})
    # Neither allowed nor disallowed: plain text.
    ids = tok.encode("a<|endoftext|>b<|im_end|>", allowed_special={"<|im_end|>"}, disallowed_special=())
    assert ids == [*tok.encode_ordinary("a<|endoftext|>b"), tok.special_tokens["<|im_end|>"]]


def test_disallowed_special_empty_encodes_special_strings_as_text(tok: Tokenizer) -> None:
    assert tok.encode(CHAT, disallowed_special=()) == tok.encode_ordinary(CHAT)


def test_encode_ordinary_never_produces_special_ids(tok: Tokenizer) -> None:
    ids = tok.encode_ordinary(CHAT)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == CHAT
    batch = tok.encode_ordinary_batch([CHAT, "<|im_start|>"])
    assert batch == [ids, tok.encode_ordinary("<|im_start|>")]


def test_unknown_names_in_the_special_policy_are_rejected(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="<bos>"):
        tok.encode("text", allowed_special={"<bos>"})
    with pytest.raises(ValueError, match="<bos>"):
        tok.encode("text", disallowed_special={"<bos>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("text", allowed_special="<|endoftext|>")  # a string, not a collection
    with pytest.raises(ValueError, match="<bos>"):
        tok.encode_batch(["text"], allowed_special={"<bos>"})


def test_overlapping_special_tokens_match_the_longest(corpus_docs: list[str]) -> None:
    t = Tokenizer.train_from_iterator(corpus_docs[:20], 400, special_tokens=["<s>", "<s>x", "x</s>"])
    sp = t.special_tokens
    assert t.encode("a<s>xb", allowed_special="all") == [ord("a"), sp["<s>x"], ord("b")]
    assert t.encode("<s><s>", allowed_special="all") == [sp["<s>"], sp["<s>"]]


# ----- batches ---------------------------------------------------------------------------------


def test_encode_batch_equals_encoding_each_document(tok: Tokenizer, corpus_docs: list[str]) -> None:
    docs = [*corpus_docs[:100], "", CHAT, " " * 3000]
    expected = [tok.encode(d, allowed_special="all") for d in docs]
    assert tok.encode_batch(docs, allowed_special="all") == expected
    arrays = tok.encode_batch(docs, allowed_special="all", return_numpy=True)
    assert [a.tolist() for a in arrays] == expected
    ordinary = [tok.encode_ordinary(d) for d in docs]
    assert tok.encode_ordinary_batch(docs) == ordinary
    assert [a.tolist() for a in tok.encode_ordinary_batch(docs, return_numpy=True)] == ordinary


def test_encode_batch_numpy_is_uint16_views_of_one_buffer(tok: Tokenizer, corpus_docs: list[str]) -> None:
    assert tok.vocab_size <= 1 << 16
    docs = corpus_docs[:50]
    arrays = tok.encode_ordinary_batch(docs, return_numpy=True)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.uint16 for a in arrays)
    assert all(not a.flags.owndata for a in arrays)
    # Consecutive documents sit next to each other in one allocation.
    address = [a.__array_interface__["data"][0] for a in arrays]
    for a, start, following in zip(arrays, address, address[1:]):
        assert start + a.nbytes == following
    assert tok.decode(arrays[0]) == docs[0]


def test_encode_batch_does_not_depend_on_thread_count(tok: Tokenizer, corpus_docs: list[str]) -> None:
    docs = corpus_docs * 4
    one = tok.encode_ordinary_batch(docs, num_threads=1)
    assert tok.encode_ordinary_batch(docs, num_threads=2) == one
    assert tok.encode_batch(docs, num_threads=2) == one
    assert tok.encode_batch(iter(docs), num_threads=1) == one  # type: ignore[arg-type]


@pytest.mark.parametrize("return_numpy", [False, True])
def test_encode_batch_of_no_documents_is_empty(tok: Tokenizer, return_numpy: bool) -> None:
    assert len(tok.encode_batch([], return_numpy=return_numpy)) == 0
    assert len(tok.encode_ordinary_batch([], return_numpy=return_numpy)) == 0


# ----- linear time on pieces with no split point -----------------------------------------------


@pytest.fixture(scope="module")
def runs_tok() -> Tokenizer:
    """A tokenizer whose merges build long chains over runs of one character."""
    docs = ["a" * 4096, "가" * 2048, " " * 4096 + "x", "ab" * 1024]
    return Tokenizer.train_from_iterator(docs, 256 + 60, min_frequency=1, special_tokens=[])


def best_time(f, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("unit", ["a", "가", " "])
def test_encoding_a_megabyte_without_split_points_is_linear(runs_tok: Tokenizer, unit: str) -> None:
    n = 1_000_000 // len(unit.encode("utf-8"))
    big = unit * n
    ids = runs_tok.encode_ordinary(big)
    assert runs_tok.decode(ids, errors="strict") == big
    assert len(ids) < n / 8  # the merge chains were used
    small = unit * (n // 4)
    t_small = best_time(lambda: runs_tok.encode_ordinary(small))
    t_big = best_time(lambda: runs_tok.encode_ordinary(big))
    # Linear is 4x and quadratic 16x; the margin between them absorbs a busy machine's noise.
    assert t_big < 11 * t_small + 0.05, f"4x the input took {t_big / t_small:.1f}x the time"


def test_session_tokenizer_handles_a_megabyte_run(tok: Tokenizer) -> None:
    for big in ("a" * 1_000_000, "ㅋ" * 300_000, "\n" * 1_000_000):
        assert tok.decode(tok.encode_ordinary(big)) == big


# ----- token bytes and decoding ----------------------------------------------------------------


def test_token_bytes_and_lengths_agree_with_decode(tok: Tokenizer) -> None:
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    n_ordinary = 256 + len(tok.merges)
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i) == tok.decode_bytes([i])
        assert lengths[i] == (len(tok.token_bytes(i)) if i < n_ordinary else 0)
    for left, right in tok.merges[:50]:
        assert tok.token_bytes(256 + tok.merges.index((left, right))) == (
            tok.token_bytes(left) + tok.token_bytes(right)
        )
    assert len({tok.token_bytes(i) for i in range(n_ordinary)}) == n_ordinary
    assert tok.token_bytes(tok.special_tokens["<|im_start|>"]) == b"<|im_start|>"


def test_unknown_id_is_a_value_error_naming_it(tok: Tokenizer) -> None:
    n = tok.vocab_size
    with pytest.raises(ValueError, match=str(n)):
        tok.decode([1, 2, n])
    with pytest.raises(ValueError, match=str(n + 7)):
        tok.token_bytes(n + 7)
    with pytest.raises(ValueError, match=str(n)):
        tok.decode_bytes(np.array([n], dtype=np.uint32))


@pytest.mark.parametrize("bad_id", [-1, 2**32 + 5])
def test_ids_outside_u32_are_value_errors_too(tok: Tokenizer, bad_id: int) -> None:
    """decode_bytes documents: "Unknown ids raise ValueError"."""
    with pytest.raises(ValueError):
        tok.decode([bad_id])
    with pytest.raises(ValueError):
        tok.token_bytes(bad_id)


def test_decode_accepts_numpy_arrays_and_integers(tok: Tokenizer) -> None:
    ids = tok.encode_ordinary("hello 안녕")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "hello 안녕"
    assert tok.decode([np.int64(i) for i in ids]) == "hello 안녕"
    assert tok.decode(iter(ids)) == "hello 안녕"


def test_decode_error_modes_on_a_split_character(tok: Tokenizer) -> None:
    partial = list("가".encode())[:2]  # ids 0..255 are the raw bytes
    with pytest.raises(UnicodeDecodeError):
        tok.decode(partial, errors="strict")
    assert tok.decode(partial) == "\ufffd"  # "replace" is the default
    assert tok.decode(partial, errors="replace") == "\ufffd"
    assert tok.decode(partial, errors="ignore") == ""
    assert tok.decode_bytes(partial) == "가".encode()[:2]


# ----- save and load ---------------------------------------------------------------------------


def test_load_of_save_is_the_same_tokenizer(tok: Tokenizer, tok_dir: Path, corpus_docs: list[str]) -> None:
    assert (tok_dir / "tokenizer.json").is_file() and (tok_dir / "tokenizer.tiktoken").is_file()
    for source in (tok_dir, tok_dir / "tokenizer.json", str(tok_dir)):
        back = Tokenizer.load(source)
        assert back.merges == tok.merges
        assert back.special_tokens == tok.special_tokens
        assert back.pattern == tok.pattern
        assert back.vocab_size == tok.vocab_size
        assert back.training_report is None
        for doc in [*corpus_docs[:30], CHAT]:
            assert back.encode(doc, allowed_special="all") == tok.encode(doc, allowed_special="all")
    assert (tok_dir / "tokenizer.json").read_text(encoding="utf-8") == tok.to_json()
    lines = (tok_dir / "tokenizer.tiktoken").read_text(encoding="ascii").splitlines()
    assert len(lines) == 256 + len(tok.merges)
    assert lines[ord(" ")] == "IA== 32"


def test_save_creates_directories_and_overwrites(tok: Tokenizer, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    tok.save(out)
    tok.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]
    assert Tokenizer.load(out).merges == tok.merges


def test_custom_pattern_survives_save_and_load(corpus_docs: list[str], tmp_path: Path) -> None:
    t = Tokenizer.train_from_iterator(corpus_docs[:50], 500, pattern=r"\S+|\s+")
    t.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.pattern == r"\S+|\s+"
    assert back.encode_ordinary(corpus_docs[60]) == t.encode_ordinary(corpus_docs[60])


def hf_trained_json(tmp_path: Path) -> Path:
    """A byte-level BPE trained by Hugging Face ``tokenizers``: its ids 0..255 are not the bytes."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\S+|\s+"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, hello there"] * 10, trainer)
    path = tmp_path / "hf" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    return path


def test_a_foreign_option_smallm_lacks_is_rejected_naming_the_file(tmp_path: Path) -> None:
    # tokenizers' ByteLevel(use_regex=False) adds a prefix space unless told not to (model files do not).
    path = hf_trained_json(tmp_path)
    with pytest.raises(ValueError, match="add_prefix_space = true") as info:
        Tokenizer.load(path.parent)
    assert str(path) in str(info.value)


def test_non_bpe_tokenizer_json_is_rejected(tok: Tokenizer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "wordpiece.json"
    HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match=r"model\.type") as info:
        Tokenizer.load(path)
    assert str(path) in str(info.value)

    # Merges in another order are another (valid) tokenizer: read with the file's priorities, as
    # tokenizers reads it, not as smallm's layout.
    doc = json.loads(tok.to_json())
    doc["model"]["merges"] = doc["model"]["merges"][::-1]
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(doc), encoding="utf-8")
    ours, theirs = Tokenizer.load(reordered), HFTokenizer.from_file(str(reordered))
    assert ours.foreign and not tok.foreign
    text = "hello world, 안녕하세요 12345"
    assert ours.encode_ordinary(text) == theirs.encode(text).ids != tok.encode_ordinary(text)


def test_corrupt_json_is_a_value_error(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_json()[:-200], encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        Tokenizer.load(tmp_path)
    assert str(path) in str(info.value)


def test_missing_tokenizer_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json


def test_repr_names_the_size_and_specials(tok: Tokenizer) -> None:
    assert repr(tok) == f"Tokenizer(vocab_size={tok.vocab_size}, special_tokens={list(tok.special_tokens)})"


# ----- pickling -------------------------------------------------------------------------------------


def test_a_pickled_tokenizer_is_the_same_tokenizer(tok: Tokenizer, corpus_docs: list[str]) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    assert copy.to_json() == tok.to_json() and copy.special_tokens == tok.special_tokens
    assert copy.training_report == tok.training_report
    assert copy.encode_ordinary_batch(corpus_docs[:20]) == tok.encode_ordinary_batch(corpus_docs[:20])


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers_encode_with_it(tok: Tokenizer, corpus_docs: list[str], start_method: str) -> None:
    """Two DataLoader workers, forked or spawned (the tokenizer crosses to them pickled), give the ids
    the main process gives."""
    torch = pytest.importorskip("torch")
    from encoded_texts import EncodedTexts

    texts = corpus_docs[:16]
    loader = torch.utils.data.DataLoader(
        EncodedTexts(tok, texts), batch_size=None, num_workers=2, multiprocessing_context=start_method
    )
    assert list(loader) == [tok.encode_ordinary(t) for t in texts]
