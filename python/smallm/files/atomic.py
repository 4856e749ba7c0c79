"""Atomic writes: what smallm writes is either all there or not there at all.

A crash, a kill or a full disk must never leave a half-written file where a good one was, so:

* a file is written to a temporary name beside it (``.NAME.tmp-PID``), flushed and fsynced, renamed over
  the target with ``os.replace``, and then the directory is fsynced so that the rename is durable too;
* a folder (a checkpoint, an export, an imported run) is filled under a temporary name beside it, every
  file and directory in it is fsynced, and it is renamed into place; a folder it replaces is moved aside
  first and deleted only once the new one is in place;
* a folder that also holds the user's own files is not replaced whole: :func:`write_entries_atomic` moves
  only the entries being replaced aside, and renames each new entry into place;
* on any failure the temporary is removed and the original error raised: what was there stays as it was.

Names that start with ``.`` and end in ``.tmp-PID`` or ``.old-PID`` (:data:`DEBRIS`) are these writes'
temporaries: a writer killed mid-way leaves them, and the next writer of that place deletes them. The
Rust core writes the shards with the same discipline (``rust/atomic.rs``). What may be replaced at all is
:mod:`smallm.files.destination`'s rule.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

__all__ = [
    "DEBRIS",
    "append_text_durable",
    "copy_file_atomic",
    "delete_entry",
    "fsync_dir",
    "read_appended",
    "scratch_directory",
    "sha256_file",
    "write_bytes_atomic",
    "write_entries_atomic",
    "write_failure",
    "write_file_atomic",
    "write_folder_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]
DEBRIS = re.compile(r"\..+\.(tmp|old)-\d+")
"""The names of the temporaries of atomic writes (``.NAME.tmp-PID``, ``.NAME.old-PID``)."""


def _fsync(path: PathLike, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: PathLike) -> None:
    """Makes a directory's entries (a rename, a new file) durable; not possible on Windows."""
    if os.name != "nt":
        _fsync(directory, os.O_RDONLY)


def _temporary(path: Path, what: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}")


def sha256_file(path: PathLike) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file and a rename."""
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_file_atomic(path: PathLike, fill: Callable[[Path], object]) -> Path:
    """Has ``fill`` write the file at a temporary path beside ``path``, syncs it and renames it to
    ``path``: a reader sees the old file or the whole new one, never part of it. The temporary file is
    removed if ``fill`` fails. Returns ``path``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        fill(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def append_text_durable(path: PathLike, text: str) -> None:
    """Appends ``text`` (UTF-8) to ``path`` and syncs it, so that what was appended survives a crash;
    a crash during the write can leave only the last line cut short, which its reader drops."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_appended(path: PathLike) -> tuple[list[tuple[int, Any]], bool]:
    """The JSON value of each line of a file :func:`append_text_durable` writes, with its line number (none
    when the file is missing), and whether its last line was cut short by an interruption (left out: only
    the last line can be). Raises ``ValueError`` naming the file and the line for any other line that is
    not JSON. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                return values, True
            raise ValueError(f"{path}:{number}: not a line of JSON") from None
    return values, False


def write_text_atomic(path: PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, data: Any) -> None:
    """``data`` as indented JSON (non-ASCII kept as is) and a final newline, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def copy_file_atomic(source: PathLike, target: PathLike) -> None:
    """A byte-for-byte copy of ``source`` at ``target``, atomically."""
    write_bytes_atomic(target, Path(source).read_bytes())


def sync_tree(directory: Path) -> None:
    """Fsyncs every file under ``directory`` and every directory's entries, ``directory`` included."""
    for path in [*directory.rglob("*"), directory]:
        if path.is_dir():
            fsync_dir(path)
        else:
            _fsync(path, os.O_RDWR)


def write_folder_atomic(final: PathLike, fill: Callable[[Path], None]) -> Path:
    """Runs ``fill(tmp)`` on an empty temporary directory beside ``final``, syncs it, and renames it to
    ``final`` (replacing a folder there, which is deleted only after the rename). Returns ``final``. On
    failure the temporary is removed, a replaced folder is put back, and the error is raised."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    displaced = _temporary(final, "old") if final.exists() else None
    try:
        fill(tmp)
        sync_tree(tmp)
        if displaced is not None:
            shutil.rmtree(displaced, ignore_errors=True)
            os.rename(final, displaced)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        if displaced is not None and displaced.exists() and not final.exists():
            os.rename(displaced, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    return final


def write_failure(path: PathLike, error: BaseException) -> str:
    """What to tell the user when writing ``path`` failed with ``error``: the error, and whether the disk is
    full (libraries report that in their own words: ``ENOSPC``, ``No space left``, fewer bytes written than
    asked)."""
    text = f"{type(error).__name__}: {error}" if not isinstance(error, OSError) else str(error)
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or any(
        sign in str(error) for sign in ("No space left", "StorageFull", "written")
    )
    return f"could not write {path}{' (the disk is full)' if full else ''}: {text}; nothing was left half written"


def write_entries_atomic(folder: PathLike, fill: Callable[[Path], None], displace: Iterable[str]) -> Path:
    """Runs ``fill(tmp)`` on an empty temporary directory beside the existing ``folder``, syncs it, moves the
    entries of ``folder`` named in ``displace`` aside, and renames each new entry into ``folder``; every other
    entry of ``folder`` stays where it is, untouched. The displaced entries are deleted once all new ones are
    in place. On failure the new entries are removed, the displaced ones put back, and the error raised.
    Raises ``FileExistsError`` (before moving anything) when a new entry would land on one that stays."""
    folder = Path(folder)
    tmp, aside = _temporary(folder), _temporary(folder, "old")
    for path in (tmp, aside):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
    moved_aside: list[str] = []
    moved_in: list[str] = []
    try:
        fill(tmp)
        sync_tree(tmp)
        displaced = set(displace)
        clashes = sorted(e.name for e in tmp.iterdir() if e.name not in displaced and _exists(folder / e.name))
        if clashes:
            raise FileExistsError(f"{folder}: would replace {', '.join(clashes)}, which is not being replaced")
        for name in sorted(displaced):
            if _exists(folder / name):
                os.rename(folder / name, aside / name)
                moved_aside.append(name)
        for entry in sorted(tmp.iterdir()):
            os.rename(entry, folder / entry.name)
            moved_in.append(entry.name)
        fsync_dir(folder)
    except BaseException:
        for name in moved_in:
            delete_entry(folder / name)
        for name in moved_aside:
            os.rename(aside / name, folder / name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def delete_entry(path: PathLike) -> None:
    """Deletes a file, a link or a whole folder (nothing if ``path`` does not exist)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif _exists(path):
        path.unlink()


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


@contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A new directory in the system's temporary folder, deleted with all it holds on leaving: for work
    whose files nobody keeps (a plan's warm-up steps run the trainer in one)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)
