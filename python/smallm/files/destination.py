"""The one rule for what a command may write over, followed by every command that writes.

Each kind of output is an :class:`Artifact`: what it is, the names it writes in its folder (or that it is
one file), and how an existing output of that kind is recognised. :func:`claim` checks a destination
against the rule before anything is written, and locks it:

* a destination that is, holds or lies inside one of the command's own inputs is refused, always;
* a destination that another live smallm process holds (its lock, or the lock of a folder it lies in) is
  refused with the holder's process id, with or without ``--force``;
* a destination that holds anything is refused without ``--force``, naming what is there;
* ``--force`` replaces only what this kind of command writes, in an output recognised as this kind's:
  the user's other files stay, and a name this command would write that belongs to something else (a
  shard directory's ``tokenizer.json`` under a new run, a run's ``config.json`` under an export, a file
  that is not this command's output) is refused even with ``--force``;
* every write is atomic (:mod:`smallm.files.atomic`).

The definitions of the artifacts live with their layouts (a run's in :mod:`smallm.run.layout`, the
shards' in :mod:`smallm.data.shards`, an export's in :mod:`smallm.interop.hf_export`...).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from smallm.errors import listing
from smallm.files.atomic import DEBRIS, delete_entry, write_entries_atomic, write_file_atomic, write_folder_atomic
from smallm.files.lock import LOCK_FILE, DestinationError, Lock, holder_of, in_use

__all__ = ["Artifact", "Destination", "DestinationError", "claim", "entries_of", "inside"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Artifact:
    """One kind of output: see the module docstring."""

    what: str
    """What it is, for messages: "a training run", "packed shards"..."""
    recognise: Callable[[Path], bool]
    """Whether an existing destination is an output of this kind (a folder, or a non-empty file)."""
    entries: tuple[str, ...] = ()
    """The names (glob patterns) it writes in its folder; empty for an output that is one file."""
    describe: Callable[[Path], str] | None = None
    """What shows that an existing folder is this kind's output, for messages (default: its entries)."""

    @property
    def folder(self) -> bool:
        return bool(self.entries)

    def writes(self, name: str) -> bool:
        """Whether ``name`` is one of the entries this kind writes in its folder."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.entries)


def entries_of(folder: Path) -> list[str]:
    """The names in ``folder`` that belong to someone: all but a lock file and the temporaries of atomic
    writes."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if e.name != LOCK_FILE and not DEBRIS.fullmatch(e.name))


def inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it."""
    return path == other or other in path.parents


class Destination:
    """A destination that :func:`claim` checked and locked: ``own`` are the entries (of a folder) that
    writing it replaces, ``kept`` those that stay. A context manager that releases the lock."""

    def __init__(self, path: Path, artifact: Artifact, own: list[str], kept: list[str], lock: Lock) -> None:
        self.path, self.artifact, self.own, self.kept, self.lock = path, artifact, own, kept, lock

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        self.lock.release()

    def write_folder(self, fill: Callable[[Path], None]) -> Path:
        """Writes the folder ``fill`` fills: as one atomic folder when nothing of it stays, else entry by
        entry beside what stays (:func:`~smallm.files.atomic.write_entries_atomic`)."""
        if self.kept:
            return write_entries_atomic(self.path, fill, self.own)
        return write_folder_atomic(self.path, fill)

    def write_file(self, fill: Callable[[Path], object]) -> Path:
        """Writes the file ``fill`` writes, atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return write_file_atomic(self.path, fill)

    def clear(self) -> None:
        """Deletes what is being replaced (for a command that then writes in place: the entries of a folder,
        or the file) and the temporaries a killed writer left in a folder."""
        if not self.artifact.folder:
            if self.own:
                delete_entry(self.path)
            return
        for name in self.own:
            delete_entry(self.path / name)
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if DEBRIS.fullmatch(entry.name):
                    delete_entry(entry)


def claim(
    path: PathLike,
    artifact: Artifact,
    *,
    force: bool,
    command: str,
    inputs: Iterable[PathLike | None] = (),
    continuing: bool = False,
    keep: Iterable[str] = (),
    flag: str = "--out",
    advice: str = "",
) -> Destination:
    """Checks ``path`` against the rule for writing ``artifact`` (see the module docstring) and locks it;
    returns the :class:`Destination` to write, or raises :class:`DestinationError` saying what is there and
    what to do. ``inputs``: what the command reads (None entries are skipped). ``continuing``: the command
    continues the output that is there (``--resume``, an interrupted packing), which must then be this
    kind's; nothing is replaced. ``keep``: names in the folder that the command reads there and leaves as
    they are (a tokenizer packed with in place). ``flag``: how the user named the destination, and
    ``advice``: what else the user may do with an output of this kind that is there (``--resume``), for
    messages."""
    path = Path(os.path.abspath(path))
    _check_inputs(path, inputs, flag)
    _check_not_held(path, artifact)
    if artifact.folder:
        own, kept = _check_folder(path, artifact, force, command, continuing, set(keep), flag, advice)
    else:
        own, kept = _check_file(path, artifact, force, command, continuing, flag)
    lock = Lock(path, command, directory=artifact.folder)
    lock.acquire()
    return Destination(path, artifact, own, kept, lock)


def _check_inputs(path: Path, inputs: Iterable[PathLike | None], flag: str) -> None:
    real = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if inside(real, source) or inside(source, real):
            relation = "is" if real == source else "lies inside" if inside(real, source) else "holds"
            raise DestinationError(
                f"{flag} {path} {relation} the command's own input {given}: writing there would destroy what it "
                "reads; choose another destination"
            )


def _check_not_held(path: Path, artifact: Artifact) -> None:
    """Refuses a destination that a live process holds, or that lies in a folder one holds."""
    if not artifact.folder:
        holder = holder_of(path, directory=False)
        if holder is not None:
            raise DestinationError(in_use(path, holder))
    for folder in [path, *path.parents]:
        holder = holder_of(folder) if folder.is_dir() else None
        if holder is not None:
            raise DestinationError(in_use(folder, holder))


def _check_folder(
    path: Path, artifact: Artifact, force: bool, command: str, continuing: bool, keep: set[str], flag: str,
    advice: str,
) -> tuple[list[str], list[str]]:  # fmt: skip
    if path.exists() and not path.is_dir():
        raise DestinationError(f"{flag} {path} is a file; {command} writes a folder there: choose a directory")
    entries = entries_of(path)
    ours = bool(entries) and artifact.recognise(path)
    own = [name for name in entries if ours and artifact.writes(name) and name not in keep]
    kept = [name for name in entries if name not in own]
    others = [name for name in kept if name not in keep]
    if continuing:
        if entries and not ours:
            raise DestinationError(f"{flag} {path} holds no {artifact.what} to continue (it holds {listing(entries)})")
        return [], entries
    if not own and not others:
        return [], kept
    if not force:
        if own:
            shown = artifact.describe(path) if artifact.describe else listing(own)
            also = f", beside {listing(others)} (kept)" if others else ""
            raise DestinationError(
                f"{flag} {path} already holds {artifact.what} ({shown}{also}); {advice}pass --force to replace it, "
                "or choose another destination"
            )
        raise DestinationError(
            f"{flag} {path} holds {listing(others)}, which {command} did not write; choose another destination, or "
            "pass --force to write beside them (they are kept)"
        )
    clashes = [name for name in others if artifact.writes(name)]
    if clashes:
        raise DestinationError(
            f"{flag} {path} holds {listing(clashes)}, which {command} would write but which are not part of "
            f"{artifact.what}: --force replaces only what {command} wrote, so it is refused; choose another "
            "destination"
        )
    return own, kept


def _check_file(
    path: Path, artifact: Artifact, force: bool, command: str, continuing: bool, flag: str
) -> tuple[list[str], list[str]]:
    if path.is_dir():
        raise DestinationError(f"{flag} {path} is a directory; {command} writes a file: give the file's path")
    if not path.exists() or path.stat().st_size == 0:
        return [], []
    if not artifact.recognise(path):
        raise DestinationError(
            f"{flag} {path} exists and is not {artifact.what}; {command} never replaces it, even with --force: "
            "choose another path"
        )
    if continuing:
        return [], []
    if not force:
        raise DestinationError(f"{flag} {path} already holds {artifact.what}; pass --force to replace it")
    return [path.name], []
