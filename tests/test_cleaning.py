"""Cleaning while packing (``smallm-tokenize --dedup``, the filters): planted exact and near copies leave the
shards, the report counts each rule per source, the result is the same for any thread count and after an
interruption, ``--dedup-against`` keeps a new corpus from repeating an old one, a filter of the user's runs,
and ``--dry-run-filters`` shows what would go without writing anything."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import smallm.text.corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_text import ENGLISH, KOREAN
from smallm.data.shards import DEDUP_KEYS, JOURNAL, MANIFEST
from test_shards import (
    interrupting_parquet_batches,
    output_files,
    read_documents,
    run_cli,
    write_jsonl,
    write_parquet,
)


def originals(count: int, seed: int = 0) -> list[str]:
    """Distinct documents of 150 to 250 words drawn at random (no two are near each other)."""
    rng = random.Random(seed)
    vocabulary = " ".join(ENGLISH + KOREAN).split()
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(150, 250))) + f" doc{i}" for i in range(count)]


def near_copy(text: str, rng: random.Random) -> str:
    """A few words changed, punctuation and spacing altered."""
    words = text.split()
    for i in rng.sample(range(len(words) - 1), 2):
        words[i] = words[i] + "s"
    return "  ".join(words).replace(" doc", ", doc") + "!"


@pytest.fixture(scope="module")
def planted() -> dict[str, list[str]]:
    """120 originals, an exact copy of 30 of them and a near copy of 30 others, shuffled; ``first``: the
    document of each original's group that comes first, which deduplication keeps."""
    rng = random.Random(1)
    base = originals(120)
    exact = [base[i] for i in range(0, 30)]
    near = [near_copy(base[i], rng) for i in range(30, 60)]
    documents = base + exact + near
    rng.shuffle(documents)
    group = {**{d: i for i, d in enumerate(base)}, **{d: 30 + i for i, d in enumerate(near)}}
    first: dict[int, str] = {}
    for d in documents:
        first.setdefault(group[d], d)
    return {"documents": documents, "base": base, "exact": exact, "near": near, "first": list(first.values())}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, planted: dict[str, list[str]]) -> Path:
    from smallm.text.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("tok")
    Tokenizer.train_from_iterator(planted["base"], 600).save(out)
    return out


def pack(tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path, name: str, *flags: str,
         documents: list[str] | None = None, corpus: Path | None = None) -> tuple[int, str, str, Path]:  # fmt: skip
    if corpus is None:
        corpus = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": d} for d in documents or []])
    out = tmp_path / name
    code, stdout, err = run_cli([str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), *flags], capsys)
    return code, stdout, err, out


def packed(out: Path) -> list[str]:
    got = read_documents(out)
    return got["train"] + got["val"]


def test_planted_copies_leave_the_shards_and_the_report_counts_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path, planted: dict[str, list[str]]
) -> None:
    code, stdout, err, out = pack(tmp_path, capsys, tokenizer_dir, "near", "--dedup", "near",
                                  documents=planted["documents"])  # fmt: skip
    assert code == 0, err
    kept = packed(out)
    assert sorted(kept) == sorted(planted["first"]), "the first of each original and its copy kept, the other gone"
    report = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["cleaning"]["sources"]["0"]
    assert report["read"]["documents"] == 180
    assert report["removed"]["exact"]["documents"] == 30
    assert report["removed"]["near"]["documents"] == 30
    assert report["kept"]["documents"] == 120
    assert "| exact | kept |" not in stdout and "| 30 | 30 | 120 |" in stdout.replace(",", "")
    assert (out / DEDUP_KEYS).is_file()

    code, _, err, exact_only = pack(tmp_path, capsys, tokenizer_dir, "exact", "--dedup", "exact",
                                    documents=planted["documents"])  # fmt: skip
    assert code == 0, err
    assert sorted(packed(exact_only)) == sorted(planted["base"] + planted["near"])  # near copies stay


def test_filters_remove_what_they_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    spam = "지금 바로 구매하세요 " * 30
    documents = ["short one", spam, *KOREAN, *(e + " " + e for e in ENGLISH)]
    code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "filtered", "--min-words", "3",
                                  "--max-dup-ngram-chars", "5:0.15", "--min-script", "hangul:0.5",
                                  documents=documents)  # fmt: skip
    assert code == 0, err
    assert spam not in packed(out) and not any(e in packed(out) for e in ENGLISH)
    assert set(packed(out)) <= {d for d in KOREAN if len(d.split()) >= 3}
    removed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["cleaning"]["sources"]["0"]["removed"]
    assert removed["min_words"]["documents"] == 1 + sum(len(d.split()) < 3 for d in KOREAN)
    assert removed["max_dup_5gram_chars"]["documents"] == 1  # the spam
    assert removed["min_script"]["documents"] >= len(ENGLISH)


def test_the_same_shards_for_any_thread_count_and_after_an_interruption(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path,
    planted: dict[str, list[str]],
) -> None:  # fmt: skip
    documents = planted["documents"]
    root = tmp_path / "corpus"
    write_jsonl(root / "a.jsonl", [{"text": d} for d in documents[:60]])
    write_parquet(root / "b.parquet", {"text": documents[60:120]})
    write_jsonl(root / "c.jsonl", [{"text": d} for d in documents[120:]])
    flags = ["--dedup", "near", "--min-words", "200", "--shard-tokens", "4000"]
    outputs = {}
    for threads in ("1", "2"):
        code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, f"t{threads}", *flags, "--threads", threads,
                                 corpus=root)  # fmt: skip
        assert code == 0, err
        outputs[threads] = output_files(out)
    assert outputs["1"] == outputs["2"]
    with monkeypatch.context() as patch:
        patch.setattr(smallm.text.corpus, "BATCH_DOCUMENTS", 8)
        patch.setattr(smallm.text.corpus, "parquet_batches", interrupting_parquet_batches(after=3))
        code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "resumed", *flags, corpus=root)
    assert code == 130 and (out / JOURNAL).exists(), err
    assert json.loads((out / JOURNAL).read_text(encoding="utf-8"))["train"], "interrupted after some shards"
    code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "resumed", *flags, corpus=root)
    assert code == 0, err
    assert output_files(out) == outputs["1"]


def test_a_new_corpus_does_not_repeat_an_old_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path, planted: dict[str, list[str]]
) -> None:
    base = planted["base"]
    code, _, err, old = pack(tmp_path, capsys, tokenizer_dir, "old", "--dedup", "near", documents=base[:60])
    assert code == 0, err
    rng = random.Random(3)
    new = [*base[50:60], near_copy(base[0], rng), *base[60:]]
    code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "new", "--dedup", "near", "--dedup-against", str(old),
                             documents=new)  # fmt: skip
    assert code == 0, err
    assert sorted(packed(out)) == sorted(base[60:])
    code, _, err, _ = pack(tmp_path, capsys, tokenizer_dir, "rows", "--dedup", "near", "--near-rows", "4",
                           "--dedup-against", str(old), documents=new)  # fmt: skip
    assert code == 1 and "made with other settings" in err and "Traceback" not in err
    code, _, err, _ = pack(tmp_path, capsys, tokenizer_dir, "plain", "--dedup-against", str(old), documents=new)
    assert code == 1 and "--dedup-against needs --dedup exact or near" in err
    corpus = write_jsonl(tmp_path / "again.jsonl", [{"text": d} for d in new])
    before = sorted(p.name for p in old.iterdir())
    code, _, err = run_cli([str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(old), "--dedup", "near",
                            "--dedup-against", str(old), "--force"], capsys)  # fmt: skip
    assert code == 1 and "Traceback" not in err, err  # its own input: refused even with --force
    assert sorted(p.name for p in old.iterdir()) == before
    code, _, err, _ = pack(tmp_path, capsys, tokenizer_dir, "nokeys", "--dedup", "exact", "--dedup-against",
                           str(tokenizer_dir), documents=new)  # fmt: skip
    assert code == 1 and "was not packed with --dedup" in err


def test_a_filter_of_ones_own_and_a_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path,
    planted: dict[str, list[str]],
) -> None:  # fmt: skip
    (tmp_path / "my_rules.py").write_text(
        "def no_digits_seven(text):\n    return '7' not in text\n\ndef broken(text):\n    raise RuntimeError('no')\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    documents = planted["documents"]
    code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "mine", "--filter", "my_rules:no_digits_seven",
                             documents=documents)  # fmt: skip
    assert code == 0, err
    assert sorted(packed(out)) == sorted(d for d in documents if "7" not in d)
    removed = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["cleaning"]["sources"]["0"]["removed"]
    assert removed == {"filter my_rules:no_digits_seven": {"documents": sum("7" in d for d in documents),
                       "bytes": sum(len(d.encode()) for d in documents if "7" in d)}}  # fmt: skip
    code, _, err, _ = pack(tmp_path, capsys, tokenizer_dir, "broken", "--filter", "my_rules:broken",
                           documents=documents)  # fmt: skip
    assert code == 1 and "--filter my_rules:broken failed on a document" in err and "Traceback" not in err
    code, _, err, _ = pack(tmp_path, capsys, tokenizer_dir, "missing", "--filter", "my_rules:nothing",
                           documents=documents)  # fmt: skip
    assert code == 1 and "my_rules has no function nothing" in err

    corpus = write_jsonl(tmp_path / "dry.jsonl", [{"text": d} for d in documents])
    code, stdout, err = run_cli(
        [str(corpus), "--dedup", "near", "--min-words", "200", "--dry-run-filters", "2"], capsys
    )
    assert code == 0, err
    assert stdout.count("[exact]") == stdout.count("[near]") == 2 and "[min_words]" in stdout
    assert "| source | documents | MB | exact | min_words | near | kept | kept MB |" in stdout
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-script", "klingon:0.5"], "--min-script takes SCRIPT:SHARE"),
        (["--dedup", "near", "--near-shingle", "bytes:5"], "--near-shingle must be words:N or chars:N"),
        (["--dedup", "near", "--near-bands", "0"], "--near-bands must be at least 1"),
        (["--max-top-ngram-chars", "2:lots"], "'lots' is not a number"),
        (["--dry-run-filters"], "--dry-run-filters shows what the cleaning flags remove"),
    ],
)
def test_bad_cleaning_flags_are_one_line(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path
) -> None:
    code, _, err, out = pack(tmp_path, capsys, tokenizer_dir, "bad", *flags, documents=["a b c"])
    assert code == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from(["a b", "a  b", " a b ", "A b", "c", "c\td", "c d", "", "é ü", "e\u0301 ü"]), max_size=30)
)
def test_exact_removal_is_first_seen_of_each_normalised_text(docs: list[str]) -> None:
    """The rule, as a property: a document goes exactly when its text with white space runs made one space and
    trimmed was seen earlier (case and Unicode composition count; empty documents are never packed)."""
    from smallm import _core
    from smallm.data.cleaning import CleanSettings
    from smallm.text.tokenizer import Tokenizer

    marker = Tokenizer.train_from_iterator(["x"], 257, special_tokens=["<|endoftext|>"])
    packer = _core.Packer(marker.core, "", 100, 0.0, "p", "<|endoftext|>",
                          clean=CleanSettings(dedup="exact").core_options(), dry_run=10**6)  # fmt: skip
    packer.add_texts(docs, 0, 0)
    removed = {s["document"] for s in json.loads(packer.clean_report())["samples"]}
    seen: set[str] = set()
    expected = set()
    for i, doc in enumerate(docs):
        key = " ".join(doc.split())
        if key in seen:
            expected.add(i)
        seen.add(key)
    assert removed == expected
