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
writes a folder follows. :class:`DirectoryLock` keeps a second process out of a directory that one is
writing in place (a shard directory being packed, a run being trained). The Rust core writes the
shards with the same discipline (``rust/atomic.rs``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

from smallm.errors import SmallmError

__all__ = [
    "LOCK_FILE",
    "DestinationError",
    "DirectoryLock",
    "append_text_durable",
    "check_destination",
    "copy_file_atomic",
    "fsync_dir",
    "sha256_file",
    "write_bytes_atomic",
    "write_file_atomic",
    "write_folder_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

PathLike = Union[str, "os.PathLike[str]"]

LOCK_FILE = ".smallm.lock"
"""The lock file :class:`DirectoryLock` keeps in the directory it guards while it holds it (deleted on
release; one left by a killed holder is unlocked, since the lock is the operating system's and dies with
the process, and is simply locked again)."""


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


class DirectoryLock:
    """An exclusive lock on ``directory`` (created if missing) held while one command writes in it, so
    that a second command on the same directory stops at once with the name of the first instead of
    interleaving its files. The lock is an ``flock`` on ``directory/.smallm.lock``: the operating system
    drops it when the holder exits, even by ``kill -9``, so no stale lock is ever left to clear by hand.
    The file records the holder (command, process id, host, start time) for the message. A context
    manager; on Windows (no ``flock``) it only records the holder."""

    def __init__(self, directory: PathLike, command: str | None = None) -> None:
        self.directory = Path(directory)
        self.command = command or Path(sys.argv[0]).name or "python"
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        self._created = not self.directory.exists()
        for _ in range(100):
            fd = self._open_locked()
            try:  # the holder may have deleted the file before we locked it: lock the one on disk
                if os.stat(self.directory / LOCK_FILE).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise DestinationError(f"could not lock {self.directory}: its lock file keeps being replaced")
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"{self.command} (process {os.getpid()} on {socket.gethostname()}, since {started})"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, holder.encode("utf-8"))
        self._fd = fd

    def _open_locked(self) -> int:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DestinationError(f"cannot write in {self.directory}: {e.strerror or e}") from e
        try:
            import fcntl
        except ImportError:  # Windows
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DestinationError(
                f"{self.directory} is in use by {holder}; wait for it to finish or stop it, or choose another directory"
            ) from None
        return fd

    def release(self) -> None:
        """Unlocks and deletes the lock file (a process that opened it meanwhile sees it gone once it has
        locked it, and locks a new one); a directory the lock created and that stayed empty goes too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.directory / LOCK_FILE).unlink()
            if self._created and not any(self.directory.iterdir()):
                self.directory.rmdir()
        os.close(self._fd)  # closing drops the flock
        self._fd = None
