"""Locks that keep a second process out of what one process is writing.

A command that writes in place for a while (a shard directory being packed, a run being trained, a file
best-of-N appends to) holds a lock on it from its first write to its end, so that a second command on the
same place stops at once, naming the first, instead of interleaving its files. A command that replaces a
place in one atomic step (an export, an import) takes the same lock meanwhile, and so is refused while a
trainer holds it.

The lock is an ``flock`` on a lock file (``DIR/.smallm.lock`` for a directory, ``.NAME.smallm.lock`` beside
a file): the operating system drops it when the holder exits, even by ``kill -9``, so no stale lock is ever
left to clear by hand. The file records the holder (command, process id, host, start time) for the
message. On Windows (no ``flock``) a lock only records its holder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Union

from smallm.errors import SmallmError

__all__ = ["LOCK_FILE", "DestinationError", "Lock", "holder_of", "lock_file_of"]

PathLike = Union[str, "os.PathLike[str]"]

LOCK_FILE = ".smallm.lock"
"""The lock file kept in a directory while a command writes in it (deleted on release; one left by a
killed holder is unlocked, since the lock dies with its process, and is simply locked again)."""


class DestinationError(SmallmError, ValueError):
    """An output that would replace something the user has, its own input, or what another process is
    writing."""


def lock_file_of(place: PathLike, *, directory: bool) -> Path:
    """The lock file of ``place``: inside it for a directory, beside it for a file."""
    place = Path(place)
    return place / LOCK_FILE if directory else place.with_name(f".{place.name}{LOCK_FILE}")


def holder_of(place: PathLike, *, directory: bool = True) -> str | None:
    """Who holds the lock of ``place`` now (the holder's line: command, process id, host, start time), or
    None when nobody does. Only looks: creates nothing, and keeps no lock."""
    file = lock_file_of(place, directory=directory)
    try:
        fd = os.open(file, os.O_RDWR)
    except OSError:
        return None
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)  # a lock taken by the probe goes with the descriptor


class Lock:
    """An exclusive lock on ``place`` (a directory, created if missing, or a file) held while one command
    writes it; see the module docstring. A context manager."""

    def __init__(self, place: PathLike, command: str | None = None, *, directory: bool = True) -> None:
        self.place, self.directory = Path(place), directory
        self.file = lock_file_of(self.place, directory=directory)
        self.command = command or Path(sys.argv[0]).name or "python"
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock, or raises :class:`DestinationError` naming the process that holds it."""
        self._created = self.directory and not self.place.exists()
        for _ in range(100):
            fd = self._open_locked()
            try:  # the holder may have deleted the file before we locked it: lock the one on disk
                if os.stat(self.file).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise DestinationError(f"could not lock {self.place}: its lock file keeps being replaced")
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"{self.command} (process {os.getpid()} on {socket.gethostname()}, since {started})"
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, holder.encode("utf-8"))
        self._fd = fd

    def _open_locked(self) -> int:
        try:
            (self.place if self.directory else self.place.parent).mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DestinationError(f"cannot write in {self.place}: {e.strerror or e}") from e
        holder = _try_lock(fd)
        if holder is not None:
            os.close(fd)
            raise DestinationError(in_use(self.place, holder))
        return fd

    def release(self) -> None:
        """Unlocks and deletes the lock file (a process that opened it meanwhile sees it gone once it has
        locked it, and locks a new one); a directory the lock created and that stayed empty goes too."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.file.unlink()
            if self._created and not any(self.place.iterdir()):
                self.place.rmdir()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def in_use(place: Path, holder: str) -> str:
    """The message for a place another process holds."""
    return f"{place} is in use by {holder}; wait for it to finish or stop it, or choose another destination"


def _try_lock(fd: int) -> str | None:
    """Locks ``fd`` (kept until it is closed) and returns None, or returns the holder's line when another
    process has it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
    return None
