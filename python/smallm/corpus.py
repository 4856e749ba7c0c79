"""Finding the corpus: command-line arguments (files, directories, globs) to a sorted list of files.

Reading and cutting the files into documents happens in the Rust core (``smallm._core``).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

DEFAULT_EXTENSIONS = (".txt", ".text", ".md", ".rst", ".py")
"""File types taken from a directory when no ``extensions`` are given."""


STDLIB_CORPUS = "@stdlib"
"""Corpus argument meaning the Python standard library sources: real text every machine has."""

_NOT_STDLIB = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """A corpus argument names nothing usable."""


def find_corpus_files(
    specs: Iterable[str | os.PathLike[str]], extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[Path]:
    """Expands files, directories (searched recursively for ``extensions``, hidden entries skipped)
    and glob patterns into a sorted, de-duplicated list of files.

    Raises :class:`CorpusError` naming the argument when one matches no file.
    """
    wanted = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    found: dict[Path, None] = {}
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
        elif glob.has_magic(spec):
            for m in sorted(glob.glob(spec, recursive=True)):
                p = Path(m)
                matches.extend(_walk(p, wanted) if p.is_dir() else [p] if p.is_file() else [])
            if not matches:
                raise CorpusError(f"{spec}: the pattern matches no file")
        else:
            raise CorpusError(f"{spec}: no such file or directory")
        for m in matches:
            found.setdefault(m, None)
    if not found:
        raise CorpusError("no corpus files given")
    return list(found)


def _walk(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and f.endswith(extensions)
        )
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
