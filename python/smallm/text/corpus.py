"""The corpus stage: which documents a run reads, from files or a Hugging Face dataset.

Command-line arguments (files, directories, globs) become a sorted list of files. Text, JSON Lines and
their gzip variants are read and cut into documents by the Rust core (``smallm._core``); parquet files
(through pyarrow) and Hugging Face datasets (through ``datasets``, streaming) are read here and handed
to the core in batches. :meth:`Corpus.sources` gives both kinds in one order, each with a source
number, so that positions in the corpus are stable for resuming.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from smallm.errors import SmallmError

DEFAULT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
"""File types taken from a directory when no ``extensions`` are given."""


STDLIB_CORPUS = "@stdlib"
"""Corpus argument meaning the Python standard library sources: real text every machine has."""

_NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(SmallmError, ValueError):
    """A corpus argument names nothing usable."""


def find_corpus_files(
    specs: Iterable[str | os.PathLike[str]], extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[Path]:
    """Expands files, directories (searched recursively for ``extensions``, hidden entries skipped)
    and glob patterns into a sorted list of files, each once however many arguments name it and
    however they spell it (paths are compared resolved: ``a.txt``, ``./a.txt``, a symlink to it).

    Raises :class:`CorpusError` naming the argument when one matches no file, or names something that
    is not a regular file (a pipe, ``/dev/stdin``), and naming the directory a walk cannot read.
    """
    wanted = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    found: dict[Path, Path] = {}
    for spec in specs:
        spec = os.fspath(spec)
        matches: list[Path] = []
        if spec == STDLIB_CORPUS:
            matches = stdlib_sources()
        elif os.path.isdir(spec):
            matches = _walk(Path(spec), wanted)
            if not matches:
                raise CorpusError(f"{spec}: directory holds no files ending in {', '.join(wanted)}")
        elif os.path.isfile(spec):
            matches = [Path(spec)]
        elif os.path.exists(spec):
            raise CorpusError(
                f"{spec}: not a regular file or directory (a pipe or a device?); the corpus is read from files, "
                "so save the text to a file first"
            )
        elif glob.has_magic(spec):
            for m in sorted(glob.glob(spec, recursive=True)):
                p = Path(m)
                matches.extend(_walk(p, wanted) if p.is_dir() else [p] if p.is_file() else [])
            if not matches:
                raise CorpusError(f"{spec}: the pattern matches no file")
        else:
            raise CorpusError(f"{spec}: no such file or directory")
        for m in matches:
            found.setdefault(m.resolve(), m)
    if not found:
        raise CorpusError("no corpus files given")
    return list(found.values())


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    def unreadable(error: OSError) -> None:
        raise CorpusError(
            f"{error.filename}: cannot read this directory of the corpus ({error.strerror}); fix its permissions "
            "or leave it out"
        )

    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and f.endswith(extensions))
    return files


def stdlib_sources() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, without its test suites and
    without installed packages (about 12 MB of code on CPython 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB and not d.startswith("."))
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise CorpusError(f"{STDLIB_CORPUS}: no Python sources found under {root}")
    return files


BATCH_DOCUMENTS = 8192
"""Documents handed to the core at a time from parquet files and datasets."""


@dataclass(frozen=True)
class FileGroup:
    """Consecutive files the Rust core reads itself; file ``i`` is source ``first_source + i``."""

    paths: list[Path]
    first_source: int


@dataclass(frozen=True)
class TextBatches:
    """A source read in Python: its number, a name for messages and a factory of document batches."""

    source: int
    name: str
    batches: Any  # Callable[[], Iterator[list[str]]]


Source = Union[FileGroup, TextBatches]


@dataclass(frozen=True)
class Corpus:
    """What a run reads: files and/or a Hugging Face dataset, and how documents are cut out of them."""

    files: list[Path] = field(default_factory=list)
    doc_mode: str = "file"
    """What a document is in a text file: ``file``, ``line`` or ``paragraph``."""
    text_field: str = "text"
    """The field holding the text in JSON Lines records, parquet rows and dataset rows."""
    lossy: bool = False
    """Replace invalid UTF-8 with U+FFFD instead of failing."""
    hf_dataset: str | None = None
    """A dataset name (or builder such as ``json``) for ``datasets.load_dataset(..., streaming=True)``."""
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: list[str] | None = None

    def sources(self) -> Iterator[Source]:
        """The sources in order: runs of core-readable files as groups, parquet files and the dataset
        as batch iterators."""
        group: list[Path] = []
        first = 0
        for i, path in enumerate(self.files):
            if path.name.lower().endswith(".parquet"):
                if group:
                    yield FileGroup(group, first)
                    group = []
                yield TextBatches(i, str(path), lambda p=path: parquet_batches(p, self.text_field))
            else:
                if not group:
                    first = i
                group.append(path)
        if group:
            yield FileGroup(group, first)
        if self.hf_dataset is not None:
            yield TextBatches(len(self.files), f"dataset {self.hf_dataset}", self._dataset_batches)

    def describe(self) -> list[dict[str, Any]]:
        """The sources as JSON-ready records (path, size, modification time), for manifests."""
        out: list[dict[str, Any]] = []
        for path in self.files:
            st = path.stat()
            out.append({"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        if self.hf_dataset is not None:
            data_files = []
            for f in self.hf_data_files or []:
                # Local files are recorded with size and time, so a resumed run notices a change.
                p = Path(f)
                data_files.append(
                    {"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                    if p.is_file()
                    else {"path": f}
                )
            out.append(
                {
                    "hf_dataset": self.hf_dataset,
                    "config": self.hf_config,
                    "split": self.hf_split,
                    "data_files": data_files,
                }
            )
        return out

    def total_file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def _dataset_batches(self) -> Iterator[list[str]]:
        rows = load_hf_dataset(self.hf_dataset or "", self.hf_config, self.hf_split, self.hf_data_files)
        batch: list[str] = []
        for i, row in enumerate(rows):
            text = row.get(self.text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(
                    f"dataset {self.hf_dataset}, row {i}: no string field {self.text_field!r} "
                    f"(the row has {fields}); choose the text field with --text-field"
                )
            batch.append(text)
            if len(batch) == BATCH_DOCUMENTS:
                yield batch
                batch = []
        if batch:
            yield batch


def parquet_batches(path: Path, text_field: str) -> Iterator[list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise CorpusError(f"{path}: reading parquet needs pyarrow (pip install 'smallm[hf]')") from e
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise CorpusError(f"{path}: not a readable parquet file: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no column {text_field!r} (the columns are {names}); choose one with --text-field")
    for record_batch in pf.iter_batches(batch_size=BATCH_DOCUMENTS, columns=[text_field]):
        column = record_batch.column(0)
        values = column.to_pylist()
        bad = next((v for v in values if not isinstance(v, str) and v is not None), None)
        if bad is not None:
            raise CorpusError(f"{path}: column {text_field!r} holds {type(bad).__name__} values, not text")
        yield [v for v in values if v]


def load_hf_dataset(
    name: str, config: str | None, split: str, data_files: list[str] | None
) -> Iterable[dict[str, Any]]:
    """Streams a dataset with ``datasets.load_dataset``; local builders (``json``, ``parquet``,
    ``text`` with ``data_files``) work offline, hub datasets need the network."""
    for file in data_files or []:  # local files: say a missing one is missing (not that the Hub is offline)
        if "://" not in file and not glob.has_magic(file) and not Path(file).exists():
            raise CorpusError(f"--hf-data-files {file}: no such file")
    try:
        import datasets
    except ImportError as e:
        raise CorpusError("--hf-dataset needs the datasets package (pip install 'smallm[hf]')") from e
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    except Exception as e:  # datasets raises many types for hub, network and file problems
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = (
            "the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is set)"
            if offline
            else "check the name, or the network if it is on the Hugging Face Hub"
        )
        raise CorpusError(
            f"could not load dataset {name!r}: {hint}. Local files work offline, e.g. "
            f"--hf-dataset json --hf-data-files data.jsonl. ({type(e).__name__}: {e})"
        ) from e
