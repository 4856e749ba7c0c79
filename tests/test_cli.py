"""``smallm-tokenize``: finding the corpus, training, writing the files, and failing clearly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sample_text import mixed_documents
from smallm import GPT2_PATTERN, Tokenizer
from smallm.cli.tokenize import main


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory tree: text files at two depths, a hidden file and directory, a file of another type."""
    root = tmp_path / "corpus"
    docs = mixed_documents(120, seed=3)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("\n".join(docs[:40]), encoding="utf-8")
    (root / "sub" / "b.md").write_text("\n\n".join(docs[40:80]), encoding="utf-8")
    (root / "sub" / "deeper" / "c.txt").write_text("\n".join(docs[80:]), encoding="utf-8")
    (root / ".secret.txt").write_bytes(b"\xff not utf-8, and hidden")
    (root / ".hidden" / "d.txt").write_bytes(b"\xff not utf-8, and hidden")
    (root / "image.bin").write_bytes(b"\xff\xfe binary, wrong extension")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str], shards: bool = False) -> tuple[int, str, str]:
    """Runs the command in-process; by default only the tokenizer stage (``--no-shards``)."""
    code = main(argv if shards else [*argv, "--no-shards"])
    out, err = capsys.readouterr()
    return code, out, err


def test_directory_input_is_searched_recursively(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tok"
    code, _, stderr = run([str(corpus), "--vocab", "600", "--out", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    assert "3 file(s)" in stderr  # a.txt, b.md, c.txt; hidden entries and image.bin are skipped
    assert f"saved {out / 'tokenizer.json'} and {out / 'tokenizer.tiktoken'}" in stderr
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600
    expected = Tokenizer.train_from_files(
        [corpus / "a.txt", corpus / "sub" / "b.md", corpus / "sub" / "deeper" / "c.txt"], 600
    )
    assert tok.merges == expected.merges
    assert (out / "tokenizer.tiktoken").is_file()


def test_extension_filter_picks_the_files(corpus: Path, tmp_path: Path, capsys) -> None:
    code, _, stderr = run([str(corpus), "--ext", "md", "--vocab", "400", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, stderr
    assert "1 file(s)" in stderr
    code, _, stderr = run([str(corpus), "--ext", ".rst", "--vocab", "400", "--out", str(tmp_path / "u")], capsys)
    assert code == 1 and ".rst" in stderr


def test_glob_and_file_inputs(corpus: Path, tmp_path: Path, capsys) -> None:
    pattern = str(corpus / "**" / "*.txt")
    code, _, stderr = run([pattern, "--vocab", "500", "--out", str(tmp_path / "g"), "--quiet"], capsys)
    assert code == 0, stderr
    assert "2 file(s)" in stderr  # a.txt and deeper/c.txt
    single = corpus / "a.txt"
    code, _, stderr = run([str(single), str(single), "--vocab", "500", "--out", str(tmp_path / "f")], capsys)
    assert code == 0, stderr
    assert "1 file(s)" in stderr  # the same file twice counts once
    assert Tokenizer.load(tmp_path / "f").merges == Tokenizer.train_from_files([single], 500).merges


@pytest.mark.parametrize("doc_mode", ["line", "paragraph"])
def test_doc_mode_is_passed_to_training(corpus: Path, tmp_path: Path, capsys, doc_mode: str) -> None:
    out = tmp_path / doc_mode
    argv = [str(corpus / "sub"), "--doc-mode", doc_mode, "--vocab", "500", "--out", str(out), "--quiet"]
    code, _, stderr = run(argv, capsys)
    assert code == 0, stderr
    files = [corpus / "sub" / "b.md", corpus / "sub" / "deeper" / "c.txt"]
    expected = Tokenizer.train_from_files(files, 500, doc_mode=doc_mode)  # type: ignore[arg-type]
    assert expected.training_report is not None
    assert f"{expected.training_report['documents']} documents" in stderr
    assert Tokenizer.load(out).merges == expected.merges


def test_existing_output_is_kept_without_force(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tok"
    assert run([str(corpus), "--vocab", "400", "--out", str(out), "--quiet"], capsys)[0] == 0
    before = {n: (out / n).read_bytes() for n in ("tokenizer.json", "tokenizer.tiktoken")}
    code, _, stderr = run([str(corpus), "--vocab", "500", "--out", str(out), "--quiet"], capsys)
    assert code == 1
    assert "--force" in stderr and "tokenizer.json" in stderr
    assert {n: (out / n).read_bytes() for n in before} == before
    code, _, stderr = run([str(corpus), "--vocab", "500", "--out", str(out), "--quiet", "--force"], capsys)
    assert code == 0, stderr
    assert Tokenizer.load(out).vocab_size == 500


def test_out_that_is_a_file_is_refused(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("keep me")
    code, _, stderr = run([str(corpus), "--out", str(out), "--quiet"], capsys)
    assert code == 1 and "is a file; smallm-tokenize writes a folder" in stderr
    assert out.read_text() == "keep me"


def test_non_utf8_file_fails_with_its_name_and_offset_unless_lossy(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text " * 50 + b"\xc3\x28 more text\n")
    code, _, stderr = run([str(bad), "--vocab", "300", "--out", str(tmp_path / "t"), "--quiet"], capsys)
    assert code == 1
    assert str(bad) in stderr and "offset 500" in stderr
    assert not (tmp_path / "t" / "tokenizer.json").exists()
    code, _, stderr = run([str(bad), "--vocab", "300", "--out", str(tmp_path / "t"), "--lossy", "--quiet"], capsys)
    assert code == 0, stderr


def test_nonexistent_corpus_path_fails_clearly(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no" / "such.txt"
    code, _, stderr = run([str(missing), "--out", str(tmp_path / "t")], capsys)
    assert code == 1
    assert str(missing) in stderr and "no such file or directory" in stderr
    code, _, stderr = run([str(tmp_path / "*.nothing"), "--out", str(tmp_path / "t")], capsys)
    assert code == 1 and "matches no file" in stderr


def test_vocab_too_small_fails(corpus: Path, tmp_path: Path, capsys) -> None:
    code, _, stderr = run([str(corpus), "--vocab", "100", "--out", str(tmp_path / "t"), "--quiet"], capsys)
    assert code == 1
    assert "vocab_size 100 is too small" in stderr
    assert not (tmp_path / "t").exists()


def test_small_corpus_warns_and_says_what_vocab_was_reached(tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.txt"
    small.write_text("tiny corpus, tiny corpus, tiny corpus.\n", encoding="utf-8")
    code, _, stderr = run([str(small), "--vocab", "5000", "--out", str(tmp_path / "t"), "--quiet"], capsys)
    assert code == 0, stderr
    reached = Tokenizer.load(tmp_path / "t").vocab_size
    assert reached < 5000
    assert "warning" in stderr and f"reached {reached}, not the 5000" in stderr


def test_pattern_and_special_tokens_options(corpus: Path, tmp_path: Path, capsys) -> None:
    argv = [str(corpus), "--vocab", "400", "--out", str(tmp_path / "t"), "--quiet"]
    code, _, stderr = run([*argv, "--pattern", "gpt2", "--special-tokens", "<s>,</s>"], capsys)
    assert code == 0, stderr
    tok = Tokenizer.load(tmp_path / "t")
    assert tok.special_tokens == {"<s>": 398, "</s>": 399}
    assert tok.pattern == GPT2_PATTERN


def test_progress_bars_are_on_by_default(corpus: Path, tmp_path: Path, capsys) -> None:
    code, _, stderr = run([str(corpus), "--vocab", "400", "--out", str(tmp_path / "t")], capsys)
    assert code == 0, stderr
    assert "merging" in stderr


def test_default_run_packs_shards_and_keeps_them_without_force(corpus: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "data"
    code, _, stderr = run([str(corpus), "--vocab", "400", "--out", str(out), "--quiet"], capsys, shards=True)
    assert code == 0, stderr
    assert Tokenizer.load(out).vocab_size == 400
    assert (out / "manifest.json").is_file()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, stderr = run([str(corpus), "--vocab", "500", "--out", str(out), "--quiet"], capsys, shards=True)
    assert code == 1 and "--force" in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_module_runs_as_a_program(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    argv = [sys.executable, "-m", "smallm.cli.tokenize", str(corpus), "--vocab", "400", "--out", str(out)]
    argv.append("--no-shards")
    result = subprocess.run([*argv, "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Tokenizer.load(out).vocab_size == 400
    again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--force" in again.stderr


def test_console_script_is_installed() -> None:
    script = shutil.which("smallm-tokenize")
    if script is None:
        pytest.skip("smallm-tokenize is not on PATH (the package is not installed as a script)")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--vocab" in result.stdout and "--doc-mode" in result.stdout
