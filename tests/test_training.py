"""Training: the merges equal a textbook BPE's, do not depend on threads or on how the corpus is fed,
and bad input fails with a message that says what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from reference_bpe import encode_reference, split_pieces, train_reference
from sample_text import CODE, EMOJI, ENGLISH, KOREAN, mixed_documents
from smallm import GPT2_PATTERN, GPT4_PATTERN, Tokenizer

SMALL_CORPORA = {
    "english": ENGLISH * 3,
    "korean": KOREAN * 3 + ["ㅋㅋㅋㅋㅋㅋㅋㅋ ㅎㅎㅎ ㅠㅠ"],
    "emoji": EMOJI * 3,
    "code": CODE * 3 + ["\t\t\n\n\n    \r\n\r\n" * 5, "x" * 40 + " " * 40],
    "mixed": mixed_documents(40, seed=7),
}
HELD_OUT = [
    *mixed_documents(20, seed=99),
    "Unseen words: antidisestablishmentarianism, 재미없었어요, 🧑\u200d🚀🚀",
    "   \n\n\t  x",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]
N_SPECIAL = 3  # the default special tokens


def reference_pieces(docs: list[str], pattern: str) -> list[str]:
    return [piece for doc in docs for piece in split_pieces(pattern, doc)]


@pytest.mark.parametrize("corpus", sorted(SMALL_CORPORA))
@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN], ids=["gpt4", "gpt2"])
@pytest.mark.parametrize("min_frequency", [1, 2])
def test_merges_equal_reference_bpe_on_small_corpora(corpus: str, pattern: str, min_frequency: int) -> None:
    docs = SMALL_CORPORA[corpus]
    n_merges = 150
    tok = Tokenizer.train_from_iterator(docs, 256 + n_merges + N_SPECIAL, pattern=pattern, min_frequency=min_frequency)
    expected = train_reference(reference_pieces(docs, pattern), n_merges, min_frequency)
    assert tok.merges == expected
    assert tok.vocab_size == 256 + len(expected) + N_SPECIAL
    for text in HELD_OUT + docs[:5]:
        assert tok.encode_ordinary(text) == encode_reference(expected, split_pieces(pattern, text)), text


def test_merges_equal_reference_bpe_with_a_custom_pattern() -> None:
    pattern = r"\S+|\s+"
    docs = SMALL_CORPORA["mixed"]
    tok = Tokenizer.train_from_iterator(docs, 256 + 200, pattern=pattern, special_tokens=[], min_frequency=1)
    expected = train_reference(reference_pieces(docs, pattern), 200)
    assert tok.merges == expected
    assert tok.pattern == pattern
    for text in HELD_OUT:
        assert tok.encode_ordinary(text) == encode_reference(expected, split_pieces(pattern, text))
        assert tok.decode(tok.encode_ordinary(text)) == text


def test_pattern_that_leaves_gaps_keeps_every_byte() -> None:
    pattern = r"\p{L}+"  # punctuation, digits and spaces fall between matches
    docs = SMALL_CORPORA["mixed"]
    tok = Tokenizer.train_from_iterator(docs, 256 + 100, pattern=pattern, special_tokens=[], min_frequency=1)
    assert tok.merges == train_reference(reference_pieces(docs, pattern), 100)
    for text in HELD_OUT:
        assert tok.decode(tok.encode_ordinary(text)) == text


def test_gpt2_preset_selects_the_gpt2_pattern(corpus_docs: list[str]) -> None:
    tok = Tokenizer.train_from_iterator(corpus_docs[:50], 400, pattern="gpt2")
    assert tok.pattern == GPT2_PATTERN
    assert Tokenizer.train_from_iterator(corpus_docs[:50], 400).pattern == GPT4_PATTERN


def test_invalid_pattern_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="pattern"):
        Tokenizer.train_from_iterator(["some text"], 300, pattern="(unclosed")


# ----- the same merges however the corpus is fed ----------------------------------------------------


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory, corpus_docs: list[str]) -> list[Path]:
    """The mixed corpus as five files, documents separated by blank lines."""
    root = tmp_path_factory.mktemp("corpus")
    paths = []
    for i in range(5):
        path = root / f"part{i}.txt"
        path.write_bytes("\n\n".join(corpus_docs[i::5]).encode("utf-8"))
        paths.append(path)
    return paths


def file_lines(paths: list[Path]) -> list[str]:
    """Non-empty lines without ``\\n`` or ``\\r\\n``: what ``doc_mode="line"`` documents."""
    lines = []
    for path in paths:
        for line in path.read_bytes().decode("utf-8").split("\n"):
            line = line[:-1] if line.endswith("\r") else line
            if line:
                lines.append(line)
    return lines


def test_training_does_not_depend_on_thread_count(corpus_files: list[Path]) -> None:
    one = Tokenizer.train_from_files(corpus_files, 1000, num_threads=1)
    two = Tokenizer.train_from_files(corpus_files, 1000, num_threads=2)
    assert one.merges == two.merges
    assert one.training_report == two.training_report
    texts = [p.read_bytes().decode("utf-8") for p in corpus_files]
    it_one = Tokenizer.train_from_iterator(texts, 1000, num_threads=1)
    it_two = Tokenizer.train_from_iterator(texts, 1000, num_threads=2)
    assert it_one.merges == it_two.merges == one.merges


def test_files_and_iterator_of_the_same_documents_give_the_same_merges(corpus_files: list[Path]) -> None:
    by_line = Tokenizer.train_from_files(corpus_files, 1000, doc_mode="line")
    lines = file_lines(corpus_files)
    from_lines = Tokenizer.train_from_iterator(iter(lines), 1000)
    assert by_line.merges == from_lines.merges
    assert by_line.training_report is not None and from_lines.training_report is not None
    assert by_line.training_report["documents"] == len(lines)
    assert by_line.training_report["unique_pieces"] == from_lines.training_report["unique_pieces"]
    assert by_line.training_report["total_pieces"] == from_lines.training_report["total_pieces"]

    whole = Tokenizer.train_from_files(corpus_files, 1000, doc_mode="file")
    texts = [p.read_bytes().decode("utf-8") for p in corpus_files]
    assert whole.merges == Tokenizer.train_from_iterator(texts, 1000).merges
    assert whole.training_report is not None and whole.training_report["documents"] == len(corpus_files)


def test_paragraph_mode_cuts_at_blank_lines(tmp_path: Path) -> None:
    paragraphs = ["first para\r\nstill first", "second para", "third\nthird again  "]
    path = tmp_path / "p.txt"
    path.write_bytes(("\n\n  \n".join(paragraphs) + "\n\n\n").encode("utf-8"))
    tok = Tokenizer.train_from_files([path], 300, doc_mode="paragraph", min_frequency=1)
    assert tok.training_report is not None and tok.training_report["documents"] == 3
    assert tok.merges == Tokenizer.train_from_iterator(paragraphs, 300, min_frequency=1).merges


def test_iterator_batch_size_does_not_change_the_merges(corpus_docs: list[str]) -> None:
    default = Tokenizer.train_from_iterator(corpus_docs, 800)
    small_batches = Tokenizer.train_from_iterator(corpus_docs, 800, batch_size=7)
    assert default.merges == small_batches.merges
    assert default.training_report == small_batches.training_report


def test_train_from_iterator_accepts_a_generator(corpus_docs: list[str]) -> None:
    tok = Tokenizer.train_from_iterator((d for d in corpus_docs), 500)
    assert tok.merges == Tokenizer.train_from_iterator(corpus_docs, 500).merges


@pytest.mark.parametrize("bad", [b"bytes", 42, None])
def test_train_from_iterator_rejects_items_that_are_not_str(bad: object) -> None:
    with pytest.raises(TypeError, match=type(bad).__name__):
        Tokenizer.train_from_iterator(["fine text", bad], 300)  # type: ignore[list-item]


# ----- the vocabulary layout -------------------------------------------------------------------------


def test_special_tokens_take_the_ids_after_the_merges(tok: Tokenizer) -> None:
    n = 256 + len(tok.merges)
    assert tok.special_tokens == {"<|endoftext|>": n, "<|im_start|>": n + 1, "<|im_end|>": n + 2}
    assert tok.eot_token == n
    assert tok.vocab_size == tok.n_vocab == n + 3
    assert all(tok.token_bytes(b) == bytes([b]) for b in range(256))


def test_custom_and_empty_special_token_lists(corpus_docs: list[str]) -> None:
    custom = Tokenizer.train_from_iterator(corpus_docs[:30], 400, special_tokens=["<pad>", "</s>"])
    assert custom.special_tokens == {"<pad>": 398, "</s>": 399}
    assert custom.eot_token is None
    none = Tokenizer.train_from_iterator(corpus_docs[:30], 400, special_tokens=[])
    assert none.special_tokens == {} and none.vocab_size == 400 and len(none.merges) == 144
    # Without special tokens nothing is special: the default policy has nothing to refuse.
    assert none.encode("<|endoftext|>") == none.encode_ordinary("<|endoftext|>")


# ----- bad input ---------------------------------------------------------------------------------------


def test_vocab_smaller_than_bytes_plus_specials_is_rejected_with_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"258.*256.*3.*259"):
        Tokenizer.train_from_iterator(["some text to train on"], 258)
    tok = Tokenizer.train_from_iterator(["some text"], 259)  # exactly the bytes and specials
    assert tok.merges == [] and tok.vocab_size == 259
    with pytest.raises(ValueError, match="32-bit"):
        Tokenizer.train_from_iterator(["some text"], 2**33)


def test_empty_corpus_is_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_from_files([empty], 300)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_from_files([], 300)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_from_iterator(iter([]), 300)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train_from_iterator(["", ""], 300)


def test_non_utf8_file_names_the_file_and_byte_offset_unless_lossy(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    valid = "caf\u00e9 ol\u00e9 na".encode()
    bad.write_bytes(valid + b"\xefve text \xff\n" * 3)
    with pytest.raises(ValueError) as info:
        Tokenizer.train_from_files([bad], 300)
    message = str(info.value)
    assert str(bad) in message and f"offset {len(valid)}" in message and "lossy" in message
    tok = Tokenizer.train_from_files([bad], 300, lossy=True, min_frequency=1)
    assert tok.training_report is not None and tok.training_report["documents"] == 1
    assert tok.encode_ordinary("\ufffd") != []


def test_missing_corpus_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        Tokenizer.train_from_files([tmp_path / "nope.txt"], 300)


def test_tiny_corpus_stops_early_and_reports_the_vocab_reached() -> None:
    tok = Tokenizer.train_from_iterator(["abc abc abd"], 1000)
    report = tok.training_report
    assert report is not None
    assert report["requested_vocab_size"] == 1000
    assert report["vocab_size"] < 1000
    assert tok.vocab_size == report["vocab_size"] == 256 + len(tok.merges) + N_SPECIAL
    assert tok.eot_token == tok.vocab_size - 3


def test_min_frequency_stops_before_rarer_pairs() -> None:
    docs = ["ab ab ab cd cd ef"]
    # "ab" is seen 3 times; after it every pair is seen at most twice.
    assert Tokenizer.train_from_iterator(docs, 1000, min_frequency=3).merges == [(ord("a"), ord("b"))]
    twice = Tokenizer.train_from_iterator(docs, 1000, min_frequency=2).merges
    assert twice == train_reference(split_pieces(GPT4_PATTERN, docs[0]), 1000, min_frequency=2)
    assert len(twice) > 1 and (ord("e"), ord("f")) not in twice


@pytest.mark.parametrize("specials", [["<|a|>", "<|a|>"], ["<|a|>", ""]])
def test_duplicate_or_empty_special_tokens_are_rejected(specials: list[str]) -> None:
    with pytest.raises(ValueError, match="special token"):
        Tokenizer.train_from_iterator(["some text"], 300, special_tokens=specials)


def test_bad_doc_mode_is_rejected(corpus_files: list[Path]) -> None:
    with pytest.raises(ValueError, match="lines"):
        Tokenizer.train_from_files(corpus_files, 300, doc_mode="lines")  # type: ignore[arg-type]


# ----- progress ------------------------------------------------------------------------------------


def test_progress_callback_sees_counting_then_merging(corpus_files: list[Path]) -> None:
    events: list[tuple[str, int, int]] = []
    tok = Tokenizer.train_from_files(
        corpus_files, 1000, progress=lambda stage, done, total: events.append((stage, done, total))
    )
    stages = [e[0] for e in events]
    assert set(stages) == {"count", "merge"}
    assert stages.index("merge") > max(i for i, s in enumerate(stages) if s == "count")
    counts = [e for e in events if e[0] == "count"]
    total_bytes = sum(p.stat().st_size for p in corpus_files)
    assert all(total == total_bytes for _, _, total in counts)
    assert [d for _, d, _ in counts] == sorted(d for _, d, _ in counts)
    assert counts[-1][1] == total_bytes
    merges = [e for e in events if e[0] == "merge"]
    assert [d for _, d, _ in merges] == sorted(d for _, d, _ in merges)
    assert all(total == 1000 - 256 - N_SPECIAL for _, _, total in merges)
    assert merges[-1][1] == len(tok.merges) == merges[-1][2]


def test_progress_reports_the_merges_reached_when_stopping_early() -> None:
    events: list[tuple[str, int, int]] = []
    tok = Tokenizer.train_from_iterator(["abc abc abd"], 1000, progress=lambda *e: events.append(e))
    assert events[-1] == ("merge", len(tok.merges), 1000 - 256 - N_SPECIAL)


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage", ["count", "merge"])
def test_exception_in_progress_callback_aborts_training(corpus_files: list[Path], stage: str) -> None:
    def callback(s: str, done: int, total: int) -> None:
        if s == stage:
            raise Stop(s)

    with pytest.raises(Stop, match=stage):
        Tokenizer.train_from_files(corpus_files, 1000, progress=callback)
    with pytest.raises(Stop, match=stage):
        Tokenizer.train_from_iterator([p.read_bytes().decode("utf-8") for p in corpus_files], 1000, progress=callback)


def test_progress_true_draws_bars_without_failing(corpus_files: list[Path]) -> None:
    tok = Tokenizer.train_from_files(corpus_files, 600, progress=True)
    assert tok.vocab_size == 600
