"""``smallm-tokenize --report``: characters and bytes per token per source and per script, counted from the
documents as the packer reads them, and the Hangul syllables that are single tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from sample_text import CODE, ENGLISH, KOREAN
from smallm import Tokenizer
from smallm.text.corpus import Corpus
from smallm.text.report import ALL_SYLLABLES, tokenizer_report


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("report")
    (root / "ko.txt").write_text("\n".join(KOREAN * 4), encoding="utf-8")
    (root / "en.txt").write_text("\n".join([*ENGLISH * 4, "12345 678", "🙂🙂"]), encoding="utf-8")
    return [root / "ko.txt", root / "en.txt"]


def test_the_counts_are_those_of_encoding_each_document(files: list[Path], tok: Tokenizer) -> None:
    report = tokenizer_report(tok, Corpus(files=files, doc_mode="line"))
    ko, en = report.sources[str(files[0])], report.sources[str(files[1])]
    assert ko.documents == 4 * len(KOREAN) and en.documents == 4 * len(ENGLISH) + 2
    assert ko.tokens == 4 * sum(len(tok.encode_ordinary(t)) for t in KOREAN)
    assert ko.chars == 4 * sum(map(len, KOREAN)) and ko.bytes == 4 * sum(len(t.encode()) for t in KOREAN)
    assert report.scripts["Hangul"].documents == 4 * len(KOREAN)
    assert report.scripts["Latin"].documents == 4 * len(ENGLISH) and report.scripts["none"].documents == 2
    assert report.total.tokens == ko.tokens + en.tokens
    assert ko.chars_per_token == ko.chars / ko.tokens and en.bytes_per_token == en.bytes / en.tokens


def test_hangul_syllables_count_as_single_when_the_tokenizer_has_them(files: list[Path], tok: Tokenizer) -> None:
    report = tokenizer_report(tok, Corpus(files=files, doc_mode="line"))
    used = {c for t in KOREAN for c in t if "가" <= c <= "힣"}
    assert set(report.syllables) == used
    assert report.single == {s for s in used if len(tok.core.encode_piece(s.encode())) == 1}
    english = Tokenizer.train_from_iterator([*ENGLISH, *CODE] * 10, 400)
    bare = tokenizer_report(english, Corpus(files=files, doc_mode="line"))
    assert bare.single == set() and bare.syllable_shares() == (0.0, 0.0, 0.0)
    assert 0 < report.single_of_all < ALL_SYLLABLES
    assert "Hangul syllables that are one token" in report.table() and "| Hangul |" in report.table()


def test_tokenize_report_prints_the_tables(files: list[Path], tok_dir: Path, tmp_path: Path, capsys) -> None:
    from smallm.cli import tokenize as tokenize_cli

    argv = [*map(str, files), "--doc-mode", "line", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d"),
            "--quiet", "--report"]  # fmt: skip
    assert tokenize_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| source | documents | chars/token | bytes/token | tokens |" in out and str(files[0]) in out
    assert "| script |" in out and "Hangul syllables that are one token:" in out
