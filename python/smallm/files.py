"""Everything smallm writes to disk goes through here: atomic files, atomic folders, and the refusal to
replace what a user already has.

A crash, a kill or a full disk must never leave a half-written file where a good one was, so:

* a file is written to a temporary name beside it (``.NAME.tmp-PID``), flushed and fsynced, renamed over
  the target with ``os.replace``, and then the directory is fsynced so that the rename is durable too;
* a folder (a checkpoint, an export, an imported run) is filled under a temporary name beside it, every
  file and directory in it is fsynced, and it is renamed into place; a folder it replaces is moved aside
  first and deleted only once the new one is in place;
* on any failure the temporary is removed and the original error raised: what was there stays as it was.

:func:`check_destination` is the "refuse an existing output without ``--force``" rule every command that
writes a folder follows. The Rust core writes the shards with the same discipline (``rust/atomic.rs``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

from smallm.errors import SmallmError

__all__ = [
    "DestinationError",
    "check_destination",
    "copy_file_atomic",
    "fsync_dir",
    "write_bytes_atomic",
    "write_folder_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]


class DestinationError(SmallmError, ValueError):
    """An output that would replace something the user has, or its own input."""


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


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a synced temporary file and a rename."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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


def check_destination(out: PathLike, force: bool, *, source: PathLike | None = None) -> None:
    """Refuses an output folder that exists and is not empty (unless ``force``), one that is not a
    folder, and one that is or holds ``source``, which replacing it would delete."""
    out = Path(os.path.abspath(out))
    if source is not None:
        source = Path(os.path.abspath(source))
        if out == source or out in source.parents:
            raise DestinationError(f"the output {out} would replace its own source {source}; choose another directory")
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DestinationError(f"{out} already exists and is not empty; pass --force (force=True) to replace it")
