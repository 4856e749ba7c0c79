"""Packing a corpus into token shards (``smallm-tokenize``, :mod:`smallm.data.shards`, ``rust/pack.rs``).

The shards are read back here with numpy alone, as a training loader would, and decoded: every input
kind gives back exactly its documents. The output does not depend on thread count, file order or an
interruption; the manifest describes the files; existing output is never replaced without --force;
bad input stops with a message that names the file and the place.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import smallm.data.shards
import smallm.text.corpus
from sample_text import mixed_documents
from smallm import GPT4_PATTERN, Tokenizer, _core
from smallm.cli.tokenize import main
from smallm.data.shards import JOURNAL, MANIFEST, PackOptions, pack_corpus
from smallm.text.corpus import Corpus

SHARD_MAGIC = 20240520
INDEX_MAGIC = 20240521
HEADER_INTS = 256
BOS = "<|endoftext|>"
VAL_FRACTION = 0.2

EXTRA_DOCUMENTS = [
    "안녕하세요! 한국어 문서입니다. 고양이가 매트 위에 앉았다. ㅋㅋㅋ",
    "emoji 👋🏽 👨\u200d👩\u200d👧\u200d👦 🇰🇷 🏳️\u200d🌈 and ✨ text",
    "def f(x):\r\n\treturn x  \r\n\r\n\r\n    # four spaces, two tabs\t\t\r\n",
    "        indented\t\twith     runs of     spaces        ",
    "<|im_start|>user\nhello<|im_end|>\n<|endoftext|> is plain text here <|endoftext|>",
    "<|endoftext|>",
    "x",
    " ",
    "a lone\rcarriage return",
    "the same text twice",
    "the same text twice",
]
DOCUMENTS = mixed_documents(90, seed=11) + EXTRA_DOCUMENTS
"""About 100 documents (30 KB): English, Korean, emoji, code with CRLF and whitespace runs,
special token strings, a duplicate."""


# ----- an independent reader of the shard format ----------------------------------------------------


def read_shard(bin_path: Path) -> list[np.ndarray]:
    """The documents of one shard as id arrays, read with numpy; checks both headers."""
    header = np.fromfile(bin_path, dtype="<i4", count=HEADER_INTS)
    assert header[0] == SHARD_MAGIC, bin_path
    assert header[1] in (1, 2), f"{bin_path}: version {header[1]}"
    assert not header[3:].any(), "the rest of the header is zero"
    dtype = np.dtype("<u2") if header[1] == 1 else np.dtype("<u4")
    tokens = np.fromfile(bin_path, dtype=dtype, offset=4 * HEADER_INTS)
    assert len(tokens) == header[2], f"{bin_path}: header says {header[2]} tokens, file holds {len(tokens)}"
    index = np.fromfile(bin_path.with_suffix(".idx"), dtype="<i8")
    assert index[:4].tolist() == [INDEX_MAGIC, 1, len(index) - 4, len(tokens)], bin_path
    starts = index[4:].tolist()
    assert starts and starts[0] == 0 and starts == sorted(set(starts)), f"{bin_path}: starts {starts}"
    bounds = [*starts, len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def shard_paths(out: Path, split: str) -> list[Path]:
    """The split's shard files, checked to be numbered 0, 1, 2... without gaps."""
    paths = sorted(out.glob(f"{split}_*.bin"))
    assert [p.name for p in paths] == [f"{split}_{k:06}.bin" for k in range(len(paths))]
    return paths


def read_documents(out: Path) -> dict[str, list[str]]:
    """Every document of each split, in shard order, decoded with the tokenizer in ``out``; checks
    that each starts with the ``<|endoftext|>`` id."""
    tok = Tokenizer.load(out)
    bos = tok.special_tokens[BOS]
    docs: dict[str, list[str]] = {}
    for split in ("train", "val"):
        docs[split] = []
        for path in shard_paths(out, split):
            for ids in read_shard(path):
                assert ids[0] == bos, f"{path}: a document starts with {ids[0]}, not {BOS} ({bos})"
                docs[split].append(tok.decode(ids[1:].tolist(), errors="strict"))
    return docs


def goes_to_validation(text: str, fraction: float) -> bool:
    """The documented split rule (rust/pack.rs): FNV-1a of the UTF-8 text, the splitmix64 finaliser,
    the top 53 bits as a fraction of 1."""
    if fraction <= 0:
        return False
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    h ^= h >> 31
    return (h >> 11) * 2.0**-53 < fraction


def output_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# ----- running the command and writing corpora --------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Runs ``smallm-tokenize`` in-process with ``--quiet``; returns (exit code, stdout, stderr)."""
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) + "\n" for i, r in enumerate(records)]
    data = "".join(lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int = 40) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def as_lines(docs: list[str]) -> list[str]:
    """The documents made single-line (a lone CR in the middle of a line stays)."""
    return [re.sub(r"\r?\n", " ⏎ ", d) for d in docs]


def as_paragraphs(docs: list[str]) -> list[str]:
    """The documents without blank lines, so that each is one paragraph; line breaks LF or CRLF."""
    paragraphs = []
    for i, doc in enumerate(docs):
        lines = [line for line in re.split(r"\r?\n", doc) if line.strip()]
        if lines:
            paragraphs.append(("\r\n" if i % 2 else "\n").join(lines))
    return paragraphs


def corpus_txt_file(root: Path) -> tuple[list[str], list[str]]:
    """A directory of .txt files, one document each; one file starts with a byte order mark."""
    root.mkdir(parents=True)
    for i, doc in enumerate(DOCUMENTS):
        prefix = "\ufeff" if i == 3 else ""
        (root / f"doc_{i:03}.txt").write_bytes((prefix + doc).encode("utf-8"))
    return [str(root)], DOCUMENTS


def line_file_bytes(lines: list[str]) -> bytes:
    """Lines ended by LF or CRLF, with empty lines between some, the last one unterminated."""
    parts = []
    for i, line in enumerate(lines):
        parts.append(line + ("\r\n" if i % 3 == 0 else "\n") + ("\n" if i % 7 == 0 else ""))
    return "".join(parts).rstrip("\n").encode("utf-8")


def corpus_txt_line(root: Path) -> tuple[list[str], list[str]]:
    root.mkdir(parents=True)
    lines = as_lines(DOCUMENTS)
    (root / "lines.txt").write_bytes(line_file_bytes(lines))
    return [str(root / "lines.txt"), "--doc-mode", "line"], lines


def corpus_txt_paragraph(root: Path) -> tuple[list[str], list[str]]:
    root.mkdir(parents=True)
    paragraphs = as_paragraphs(DOCUMENTS)
    separators = ("\n\n", "\r\n\r\n", "\n \t\n\n")
    text = "\n\n\n" + "".join(p + separators[i % 3] for i, p in enumerate(paragraphs))
    (root / "paragraphs.txt").write_bytes(text.encode("utf-8"))
    return [str(root / "paragraphs.txt"), "--doc-mode", "paragraph"], paragraphs


def corpus_jsonl(root: Path) -> tuple[list[str], list[str]]:
    """Records with the text in ``body``, other fields beside it, and a record with empty text."""
    records: list[dict[str, Any]] = [{"id": i, "body": d, "meta": {"n": [i]}} for i, d in enumerate(DOCUMENTS)]
    records.insert(5, {"id": -1, "body": ""})
    path = write_jsonl(root / "records.jsonl", records)
    return [str(path), "--text-field", "body"], DOCUMENTS


def corpus_txt_gz(root: Path) -> tuple[list[str], list[str]]:
    """Line documents in a gzip file made of two members."""
    root.mkdir(parents=True)
    lines = as_lines(DOCUMENTS)
    half = len(lines) // 2
    data = gzip.compress(line_file_bytes(lines[:half]) + b"\n") + gzip.compress(line_file_bytes(lines[half:]))
    (root / "lines.txt.gz").write_bytes(data)
    return [str(root / "lines.txt.gz"), "--doc-mode", "line"], lines


def corpus_jsonl_gz(root: Path) -> tuple[list[str], list[str]]:
    path = write_jsonl(root / "records.jsonl.gz", [{"text": d} for d in DOCUMENTS])
    return [str(path)], DOCUMENTS


def corpus_parquet(root: Path) -> tuple[list[str], list[str]]:
    """A parquet file of several row groups, with a null and an empty text among the rows."""
    texts: list[str | None] = [*DOCUMENTS[:10], None, "", *DOCUMENTS[10:]]
    path = write_parquet(root / "rows.parquet", {"id": list(range(len(texts))), "text": texts})
    return [str(path)], DOCUMENTS


def corpus_hf_json(root: Path) -> tuple[list[str], list[str]]:
    pytest.importorskip("datasets")
    path = write_jsonl(root / "records.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCUMENTS)])
    return ["--hf-dataset", "json", "--hf-data-files", str(path)], DOCUMENTS


def corpus_hf_parquet(root: Path) -> tuple[list[str], list[str]]:
    pytest.importorskip("datasets")
    path = write_parquet(root / "rows.parquet", {"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))})
    return ["--hf-dataset", "parquet", "--hf-data-files", str(path)], DOCUMENTS


CORPUS_KINDS: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {
    "txt-file": corpus_txt_file,
    "txt-line": corpus_txt_line,
    "txt-paragraph": corpus_txt_paragraph,
    "jsonl": corpus_jsonl,
    "txt.gz": corpus_txt_gz,
    "jsonl.gz": corpus_jsonl_gz,
    "parquet": corpus_parquet,
    "hf-json": corpus_hf_json,
    "hf-parquet": corpus_hf_parquet,
}
"""Each writes DOCUMENTS (or their single-line / paragraph forms) as one input kind and returns the
command-line arguments that read them and the documents expected back."""


def mixed_corpus(root: Path) -> list[str]:
    """A directory of every file kind the core and the Python side read: .txt files (one document
    each), .jsonl, .jsonl.gz and .parquet. Returns the documents it holds."""
    root.mkdir(parents=True)
    for i, doc in enumerate(DOCUMENTS[:30]):
        (root / f"a_{i:02}.txt").write_bytes(doc.encode("utf-8"))
    write_jsonl(root / "b.jsonl", [{"text": d} for d in DOCUMENTS[30:55]])
    write_parquet(root / "c.parquet", {"text": DOCUMENTS[55:80]}, row_group_size=10)
    write_jsonl(root / "d.jsonl.gz", [{"text": d} for d in DOCUMENTS[80:]])
    return DOCUMENTS


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-id tokenizer trained on DOCUMENTS, saved for ``--tokenizer``."""
    out = tmp_path_factory.mktemp("shards-tok")
    Tokenizer.train_from_iterator(DOCUMENTS, 400).save(out)
    return out


# ----- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CORPUS_KINDS))
def test_shards_give_back_every_document_of_every_input_kind(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = CORPUS_KINDS[kind](tmp_path / "corpus")
    out = tmp_path / "out"
    argv = [*args, "--vocab", "400", "--val-fraction", str(VAL_FRACTION), "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    docs = read_documents(out)
    assert docs["train"] and docs["val"], "both splits hold documents"
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)
    assert all(goes_to_validation(d, VAL_FRACTION) for d in docs["val"])
    assert not any(goes_to_validation(d, VAL_FRACTION) for d in docs["train"])


@pytest.mark.skipif(shutil.which("smallm-tokenize") is None, reason="the console script is not on PATH")
def test_console_script_packs_a_directory_of_mixed_file_kinds(tmp_path: Path) -> None:
    expected = mixed_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["smallm-tokenize", str(tmp_path / "corpus"), "--vocab", "400", "--shard-tokens", "2000"]
    argv += ["--val-fraction", str(VAL_FRACTION), "--out", str(out), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "packed in" in proc.stdout and "train" in proc.stdout
    docs = read_documents(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(expected)


def test_special_token_strings_inside_documents_stay_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    specials = [
        "<|im_start|>user\nhi<|im_end|>",
        "<|endoftext|>",
        "before<|endoftext|>after<|im_start|><|im_start|>",
        "<|im_end|> then <|endoftext|> then <|im_start|>",
        "<|endoftext",
    ]
    docs = specials * 3 + DOCUMENTS[:20]
    path = write_jsonl(tmp_path / "special.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out)], capsys)
    assert code == 0, err
    tok = Tokenizer.load(out)
    special_ids = set(tok.special_tokens.values())
    n_docs = 0
    for split in ("train", "val"):
        for shard in shard_paths(out, split):
            for ids in read_shard(shard):
                assert ids[0] == tok.special_tokens[BOS]
                assert not special_ids & set(ids[1:].tolist()), tok.decode(ids.tolist())
                n_docs += 1
    assert n_docs == len(docs)
    got = read_documents(out)
    assert sorted(got["train"] + got["val"]) == sorted(docs)


def test_vocabularies_over_65536_ids_are_stored_as_uint32(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    every_byte_pair = [(a, b) for a in range(256) for b in range(256)]
    tok = Tokenizer(_core.Tokenizer.from_merges(GPT4_PATTERN, every_byte_pair, [BOS]))
    assert tok.vocab_size > 1 << 16
    tok.save(tmp_path / "tok")
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--tokenizer", str(tmp_path / "tok"), "--out", str(out)], capsys)
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["dtype"] == "uint32"
    assert np.fromfile(out / "train_000000.bin", dtype="<i4", count=2).tolist() == [SHARD_MAGIC, 2]
    docs = read_documents(out)
    assert sorted(docs["train"] + docs["val"]) == sorted(DOCUMENTS)
    assert max(int(ids.max()) for ids in read_shard(out / "train_000000.bin")) > 1 << 16


# ----- determinism and layout ----------------------------------------------------------------------


def test_output_is_byte_identical_for_one_or_two_threads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mixed_corpus(tmp_path / "corpus")
    runs = []
    for threads in ("1", "2"):
        out = tmp_path / f"out{threads}"
        argv = [str(tmp_path / "corpus"), "--vocab", "400", "--shard-tokens", "500", "--threads", threads]
        code, _, err = run_cli([*argv, "--val-fraction", str(VAL_FRACTION), "--out", str(out)], capsys)
        assert code == 0, err
        runs.append(output_files(out))
    assert len([n for n in runs[0] if n.endswith(".bin")]) > 3
    assert {"manifest.json", "tokenizer.json", "tokenizer.tiktoken"} <= runs[0].keys()
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert runs[0][name] == runs[1][name], f"{name} differs between 1 and 2 threads"


def test_documents_never_span_shards_and_shards_respect_the_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    long_doc = " ".join(DOCUMENTS[:25])
    docs = [*DOCUMENTS, long_doc]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "out"
    argv = [str(path), "--tokenizer", str(tokenizer_dir), "--shard-tokens", "500", "--out", str(out)]
    code, _, err = run_cli([*argv, "--val-fraction", str(VAL_FRACTION)], capsys)
    assert code == 0, err
    assert len(shard_paths(out, "train")) >= 3
    longest_alone = 0
    for split in ("train", "val"):
        shards = [read_shard(p) for p in shard_paths(out, split)]
        for k, shard in enumerate(shards):
            tokens = sum(len(d) for d in shard)
            assert tokens <= 500 or len(shard) == 1, f"{split} shard {k}: {tokens} tokens"
            if len(shard) == 1:
                longest_alone = max(longest_alone, tokens)
            if k + 1 < len(shards):
                # A shard is closed only when the next document would not fit in it.
                assert tokens + len(shards[k + 1][0]) > 500, f"{split} shard {k} closed early"
    assert longest_alone > 500, "the long document gets a shard of its own"
    got = read_documents(out)
    assert sorted(got["train"] + got["val"]) == sorted(docs)


def test_manifest_describes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    expected = mixed_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = [str(tmp_path / "corpus"), "--tokenizer", str(tokenizer_dir), "--shard-tokens", "500"]
    code, _, err = run_cli([*argv, "--val-fraction", str(VAL_FRACTION), "--out", str(out)], capsys)
    assert code == 0, err
    m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    tok = Tokenizer.load(out)
    assert (m["format"], m["format_version"]) == ("smallm-shards", 1)
    assert m["tokenizer"]["file"] == "tokenizer.json"
    assert m["tokenizer"]["sha256"] == smallm.data.shards.sha256_file(tokenizer_dir / "tokenizer.json")
    assert (m["vocab_size"], m["dtype"], m["shard_tokens"]) == (tok.vocab_size, "uint16", 500)
    assert m["bos_id"] == tok.special_tokens[BOS]
    assert m["special_tokens"] == tok.special_tokens
    assert m["options"]["val_fraction"] == VAL_FRACTION and m["options"]["doc_mode"] == "file"
    assert m["options"]["pattern"] == tok.pattern
    assert len(m["sources"]) == 33  # 30 .txt, .jsonl, .jsonl.gz, .parquet
    assert all(Path(s["path"]).is_absolute() and s["bytes"] > 0 for s in m["sources"])

    listed = set()
    for split in ("train", "val"):
        shards = m["splits"][split]
        assert [s["file"] for s in shards] == [p.name for p in shard_paths(out, split)]
        for s in shards:
            listed |= {s["file"], s["index"]}
            docs = read_shard(out / s["file"])
            assert s["index"] == Path(s["file"]).with_suffix(".idx").name
            assert s["documents"] == len(docs)
            assert s["tokens"] == sum(len(d) for d in docs)
            text = [tok.decode(d[1:].tolist()) for d in docs]
            assert s["text_bytes"] == sum(len(t.encode("utf-8")) for t in text)
        totals = m["totals"][split]
        assert totals["shards"] == len(shards)
        for key in ("documents", "tokens", "text_bytes"):
            assert totals[key] == sum(s[key] for s in shards), key
        content_tokens = totals["tokens"] - totals["documents"]
        assert totals["bytes_per_token"] == pytest.approx(totals["text_bytes"] / content_tokens, abs=1e-4)
        assert totals["bytes_per_token"] > 1
    assert sum(m["totals"][s]["documents"] for s in ("train", "val")) == len(expected)
    on_disk = {p.name for p in out.iterdir()}
    assert on_disk == listed | {MANIFEST, "tokenizer.json", "tokenizer.tiktoken"}


def test_validation_split_depends_only_on_document_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    docs = DOCUMENTS
    in_two = [
        write_jsonl(tmp_path / "a" / "first.jsonl", [{"text": d} for d in docs[:50]]),
        write_jsonl(tmp_path / "a" / "second.jsonl", [{"text": d} for d in docs[50:]]),
    ]
    reversed_ = [write_jsonl(tmp_path / "b" / "all.jsonl", [{"text": d} for d in reversed(docs)])]
    splits = []
    for name, files in (("two", in_two), ("reversed", reversed_)):
        out = tmp_path / f"out-{name}"
        argv = [*map(str, files), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
        code, _, err = run_cli([*argv, "--val-fraction", str(VAL_FRACTION)], capsys)
        assert code == 0, err
        got = read_documents(out)
        splits.append({split: sorted(got[split]) for split in got})
    assert splits[0] == splits[1]
    assert splits[0]["val"] == sorted(d for d in docs if goes_to_validation(d, VAL_FRACTION))
    assert splits[0]["val"] and splits[0]["train"]
    twice = "the same text twice"
    assert splits[0]["train"].count(twice) + splits[0]["val"].count(twice) == 2
    assert twice not in splits[0]["train"] or twice not in splits[0]["val"], "duplicates share a split"


# ----- interruptions --------------------------------------------------------------------------------


def interrupting_parquet_batches(after: int) -> Callable[[Path, str], Any]:
    """A stand-in for ``smallm.text.corpus.parquet_batches`` that raises KeyboardInterrupt (Ctrl-C) after
    ``after`` batches."""
    read = smallm.text.corpus.parquet_batches

    def batches(path: Path, text_field: str) -> Any:
        for i, batch in enumerate(read(path, text_field)):
            if i == after:
                raise KeyboardInterrupt
            yield batch

    return batches


def test_interrupted_run_resumes_to_byte_identical_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path
) -> None:
    root = tmp_path / "corpus"
    write_jsonl(root / "a.jsonl", [{"text": d} for d in DOCUMENTS[:40]])
    write_parquet(root / "b.parquet", {"text": DOCUMENTS[40:80]})
    write_jsonl(root / "c.jsonl", [{"text": d} for d in DOCUMENTS[80:]])
    options = ["--shard-tokens", "300", "--val-fraction", str(VAL_FRACTION)]

    whole = tmp_path / "whole"
    code, _, err = run_cli([str(root), "--tokenizer", str(tokenizer_dir), *options, "--out", str(whole)], capsys)
    assert code == 0, err

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(smallm.text.corpus, "BATCH_DOCUMENTS", 8)
        patch.setattr(smallm.text.corpus, "parquet_batches", interrupting_parquet_batches(after=2))
        code, _, err = run_cli([str(root), "--tokenizer", str(tokenizer_dir), *options, "--out", str(out)], capsys)
    assert code == 130, err
    assert "interrupted" in err
    assert (out / JOURNAL).exists() and not (out / MANIFEST).exists()
    journal = json.loads((out / JOURNAL).read_text(encoding="utf-8"))
    finished = [s["file"] for split in ("train", "val") for s in journal[split]]
    assert 0 < len(finished) < len(list(whole.glob("*.bin"))), "interrupted midway"
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(finished)
    for name in finished:
        assert (out / name).read_bytes() == (whole / name).read_bytes()

    code, _, err = run_cli([str(root), *options, "--out", str(out)], capsys)
    assert code == 0, err
    assert "resuming" in err
    assert not (out / JOURNAL).exists()
    assert output_files(out) == output_files(whole)


def test_interrupted_packing_resumes_only_with_the_same_setup(tmp_path: Path, tokenizer_dir: Path) -> None:
    paths = [
        write_jsonl(tmp_path / "corpus" / f"part{i}.jsonl", [{"text": d} for d in DOCUMENTS[i::3]]) for i in range(3)
    ]
    corpus = Corpus(files=paths)
    tok = Tokenizer.load(tokenizer_dir)
    options = PackOptions(shard_tokens=400, val_fraction=VAL_FRACTION)
    whole, out = tmp_path / "whole", tmp_path / "out"
    for d in (whole, out):
        shutil.copytree(tokenizer_dir, d)
    manifest = pack_corpus(corpus, tok, whole, options, progress=False)

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # from the progress callback the Rust packer calls

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(smallm.data.shards._PackProgress, "update", interrupt)
        with pytest.raises(KeyboardInterrupt):
            pack_corpus(corpus, tok, out, options, progress=False)
    assert (out / JOURNAL).exists() and not (out / MANIFEST).exists()
    assert 0 < len(list(out.glob("*.bin"))) < len(list(whole.glob("*.bin"))), "interrupted midway"
    journal_before = (out / JOURNAL).read_bytes()

    other = PackOptions(shard_tokens=500, val_fraction=VAL_FRACTION)
    with pytest.raises(ValueError, match="--force"):
        pack_corpus(corpus, tok, out, other, progress=False)
    assert (out / JOURNAL).read_bytes() == journal_before

    assert pack_corpus(corpus, tok, out, options, progress=False) == manifest
    assert not (out / JOURNAL).exists()
    assert output_files(out) == output_files(whole)


def test_run_interrupted_before_its_first_shard_resumes_with_its_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after training, while the first shard is still open (with the default shard size, all
    of packing for a corpus under ~100M tokens): the message promises that a re-run resumes."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    argv = [str(path), "--vocab", "400", "--out", str(out)]

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(smallm.data.shards._PackProgress, "update", interrupt)
        code, _, err = run_cli(argv, capsys)
    assert code == 130 and "a re-run resumes" in err
    trained = (out / "tokenizer.json").read_bytes()

    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == trained, "the trained tokenizer is kept"
    got = read_documents(out)
    assert sorted(got["train"] + got["val"]) == sorted(DOCUMENTS)


@pytest.mark.parametrize(
    "bad_option",
    [["--val-fraction", "1"], ["--shard-tokens", "0"], ["--special-tokens", "<|im_end|>"]],
    ids=["val-fraction", "shard-tokens", "no-endoftext"],
)
def test_run_refused_for_a_bad_option_can_be_rerun_once_corrected(
    bad_option: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad packing option stops the run; running again with it corrected must not then be refused
    because the failed run left its tokenizer in --out."""
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    argv = [str(path), "--vocab", "400", "--out", str(tmp_path / "out")]
    code, _, err = run_cli([*argv, *bad_option], capsys)
    assert code == 1, err
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err


# ----- what is already in --out --------------------------------------------------------------------


def test_existing_shards_are_kept_without_force_and_replaced_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    argv = [str(path), "--tokenizer", str(tokenizer_dir), "--out", str(out)]
    code, _, err = run_cli([*argv, "--shard-tokens", "300"], capsys)
    assert code == 0, err
    before = output_files(out)
    mtime = (out / MANIFEST).stat().st_mtime_ns

    code, _, err = run_cli([*argv, "--shard-tokens", "5000"], capsys)
    assert code == 1
    assert "--force" in err and MANIFEST in err
    assert output_files(out) == before and (out / MANIFEST).stat().st_mtime_ns == mtime

    code, _, err = run_cli([*argv, "--shard-tokens", "5000", "--force"], capsys)
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["shard_tokens"] == 5000
    shards = [s for split in manifest["splits"].values() for s in split]
    assert len([n for n in before if n.endswith(".bin")]) > len(shards), "the first run left more shards"
    listed = {s[key] for s in shards for key in ("file", "index")}
    assert {p.name for p in out.iterdir()} == listed | {MANIFEST, "tokenizer.json", "tokenizer.tiktoken"}


def test_existing_tokenizer_is_not_overwritten_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--vocab", "400", "--out", str(out), "--no-shards"], capsys)
    assert code == 0, err
    saved = output_files(out)
    for extra in (["--no-shards"], []):
        code, _, err = run_cli([str(path), "--vocab", "300", "--out", str(out), *extra], capsys)
        assert code == 1
        assert "tokenizer.json" in err and "--force" in err
        assert output_files(out) == saved
    code, _, err = run_cli([str(path), "--vocab", "300", "--out", str(out), "--force"], capsys)
    assert code == 0, err
    assert Tokenizer.load(out).vocab_size == 300


def test_given_tokenizer_is_reused_without_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--tokenizer", str(tokenizer_dir), "--vocab", "300", "--out", str(out)], capsys)
    assert code == 0, err
    assert "training" not in err and "using the tokenizer" in err
    for name in ("tokenizer.json", "tokenizer.tiktoken"):
        assert (out / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    assert (out / MANIFEST).exists()


def test_tokenizer_already_in_out_can_be_reused_in_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    shutil.copytree(tokenizer_dir, out)
    code, _, err = run_cli([str(path), "--tokenizer", str(out), "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    got = read_documents(out)
    assert sorted(got["train"] + got["val"]) == sorted(DOCUMENTS)


def test_no_shards_writes_only_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--vocab", "400", "--out", str(out), "--no-shards"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer.tiktoken"]


# ----- bad input -------------------------------------------------------------------------------------


def test_malformed_json_line_is_named_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "unterminated\n{"text": "fine"}\n', encoding="utf-8")
    code, _, err = run_cli([str(path), "--vocab", "300", "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert str(path) in err and "line 3" in err and "not valid JSON" in err
    assert "Traceback" not in err


def test_jsonl_record_without_the_text_field_lists_its_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "fine"}, {"content": "x", "id": 7}])
    code, _, err = run_cli([str(path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert str(path) in err and "line 2" in err
    assert '"content"' in err and '"id"' in err and "--text-field" in err


def test_parquet_without_the_text_column_lists_its_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    path = write_parquet(tmp_path / "rows.parquet", {"content": ["a", "b"], "id": [1, 2]})
    code, _, err = run_cli([str(path), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert str(path) in err and "'text'" in err and "content" in err and "--text-field" in err
    code, _, err = run_cli(
        [
            str(path),
            "--text-field",
            "content",
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(tmp_path / "ok"),
        ],
        capsys,
    )
    assert code == 0, err
    got = read_documents(tmp_path / "ok")
    assert sorted(got["train"] + got["val"]) == ["a", "b"]


def test_invalid_utf8_is_named_by_byte_offset_and_lossy_replaces_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    raw = b"valid text \xff\xfe then more \xe2\x82 end"
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    argv = [str(path), "--tokenizer", str(tokenizer_dir)]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 1
    assert str(path) in err and "byte offset 11" in err and "--lossy" in err

    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"good\nstill good\nbad \xfe here\n")
    code, _, err = run_cli([str(lines), "--doc-mode", "line", *argv[1:], "--out", str(tmp_path / "o2")], capsys)
    assert code == 1
    assert str(lines) in err and "line 3" in err and "byte offset 20" in err

    code, _, err = run_cli([*argv, "--lossy", "--out", str(tmp_path / "lossy")], capsys)
    assert code == 0, err
    got = read_documents(tmp_path / "lossy")
    assert got["train"] + got["val"] == [raw.decode("utf-8", errors="replace")]


def test_hub_dataset_offline_suggests_local_files(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is first imported.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "smallm.cli.tokenize", "--hf-dataset", "someone/nonexistent"]
    argv += ["--out", str(tmp_path / "out"), "--vocab", "300", "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "someone/nonexistent" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert "--hf-data-files" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_missing_data_file_of_a_dataset_is_named_not_blamed_on_the_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "missing.jsonl"
    argv = ["--hf-dataset", "json", "--hf-data-files", str(missing), "--out", str(tmp_path / "o")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and f"--hf-data-files {missing}: no such file" in err and "Hub" not in err
    assert not (tmp_path / "o").exists()


def test_missing_corpus_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["--out", str(tmp_path / "out")], capsys)
    assert code == 1 and "--hf-dataset" in err
    missing = tmp_path / "nowhere.txt"
    code, _, err = run_cli([str(missing), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_endoftext_cannot_pack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCUMENTS])
    out = tmp_path / "out"
    argv = [str(path), "--vocab", "300", "--special-tokens", "<|im_end|>", "--out", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 1
    assert BOS in err
    assert not list(out.glob("*.bin")) and not (out / MANIFEST).exists() and not (out / JOURNAL).exists()
