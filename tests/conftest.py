"""Shared fixtures: a mixed in-test corpus, one small tokenizer trained on it, shard directories and runs
made from inline text and models, the shared corpora.

Everything the suite trains on is made here from inline strings (a few tens of KB), so the suite is
hermetic; only the tests that need ``../shared/data`` use it, and they skip when it is absent.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from sample_text import CODE, ENGLISH, KOREAN, mixed_documents
from smallm import Tokenizer
from smallm.data.shards import PackOptions, pack_corpus
from smallm.text.corpus import Corpus

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.register_profile("thorough", deadline=None, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def corpus_docs() -> list[str]:
    """The mixed in-test corpus (about 75 KB), one string per document."""
    return mixed_documents()


@pytest.fixture(scope="session")
def tok(corpus_docs: list[str]) -> Tokenizer:
    """One small tokenizer (1200 ids, default gpt4 pattern and special tokens) most tests reuse."""
    return Tokenizer.train_from_iterator(corpus_docs, 1200)


@pytest.fixture(scope="session")
def tok_dir(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session tokenizer saved as ``tokenizer.json`` and ``tokenizer.tiktoken``."""
    out = tmp_path_factory.mktemp("tok")
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository; tests that use it skip when it is absent."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data is absent (a fresh clone has no shared corpora): looked in {path}")
    return path


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Models as small as the tests' run fastest on one thread (a busy machine hurts two threads most)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MakeShards = Callable[..., Path]


@pytest.fixture(scope="session")
def make_shards(tmp_path_factory: pytest.TempPathFactory) -> MakeShards:
    """``make_shards(lines, vocab=400, tokenizer=None, **pack_options)``: a shard directory made by
    ``pack_corpus`` from ``lines`` (one document each), with ``tokenizer`` or one of ``vocab`` ids
    trained on them."""

    def make(lines: Sequence[str], vocab: int = 400, tokenizer: Tokenizer | None = None, **options: object) -> Path:
        root = tmp_path_factory.mktemp("shards")
        (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
        corpus = Corpus(files=[root / "corpus.txt"], doc_mode="line")
        out = root / "data"
        out.mkdir()
        tokenizer = tokenizer or Tokenizer.train_from_corpus(corpus, vocab)
        tokenizer.save(out)
        pack_corpus(corpus, tokenizer, out, PackOptions(**options), progress=False)  # type: ignore[arg-type]
        return out

    return make


@pytest.fixture(scope="session")
def save_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``save_run(model, tokenizer, directory=None)``: a run directory of one checkpoint of ``model``
    (:func:`smallm.run.load.write_run`), in a new temporary directory unless one is given."""
    from smallm.run.write import write_run

    def save(model: object, tokenizer: Tokenizer | None, directory: Path | None = None) -> Path:
        directory = directory or tmp_path_factory.mktemp("run") / "run"
        config = {"train": {}, "model": dataclasses.asdict(model.config)}  # type: ignore[attr-defined]
        return write_run(directory, model, tokenizer, config, force=True)  # type: ignore[arg-type]

    return save


@pytest.fixture(scope="module")
def shared_tokenizer(corpus_docs: list[str]) -> Tokenizer:
    return Tokenizer.train_from_iterator(corpus_docs, 500)


@pytest.fixture(scope="module")
def sources(make_shards: MakeShards, shared_tokenizer: Tokenizer) -> dict[str, Path]:
    """Three sources (a mixture's tests) packed with one tokenizer: English, Korean, code (each line a document)."""
    texts = {"en": ENGLISH * 40, "ko": KOREAN * 40, "code": [c.replace("\n", " ") for c in CODE] * 40}
    numbered = {name: [f"{line} {i}" for i, line in enumerate(lines)] for name, lines in texts.items()}  # all distinct
    return {name: make_shards(lines, tokenizer=shared_tokenizer, val_fraction=0.2) for name, lines in numbered.items()}


@pytest.fixture(scope="session")
def llama_cpp() -> object:
    """The ``llama_cpp`` module (llama-cpp-python), or the test skips naming the extra that installs it."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llamacpp]')")
