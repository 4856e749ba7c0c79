"""Writing to disk: atomic files and folders keep what was there when a write fails, sync what they write,
and an existing output is never replaced without force."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from smallm import files
from smallm.files import (
    DestinationError,
    check_destination,
    copy_file_atomic,
    write_bytes_atomic,
    write_folder_atomic,
    write_json_atomic,
)


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_atomic_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_json_atomic(target, {"a": "한국어"})
    write_json_atomic(target, {"b": 2})
    assert target.read_text(encoding="utf-8") == '{\n  "b": 2\n}\n'
    assert entries(tmp_path) == ["f.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.txt"
    write_bytes_atomic(target, b"old")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["f.txt"]


def test_a_copy_syncs_the_data_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").write_bytes(b"tokenizer")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    copy_file_atomic(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == b"tokenizer"
    assert len(synced) == 2  # the temporary file's data, then the directory holding the renamed file
    if Path("/proc/self/fd").is_dir():
        assert Path(synced[0]).parent == tmp_path and synced[1] == str(tmp_path)


def test_a_folder_is_filled_beside_and_renamed_into_place(tmp_path: Path) -> None:
    final = tmp_path / "out"
    seen: list[Path] = []

    def fill(directory: Path) -> None:
        seen.append(directory)
        assert not final.exists()  # nothing is in place until the folder is complete
        (directory / "a.txt").write_text("a")
        (directory / "sub").mkdir()
        (directory / "sub" / "b.txt").write_text("b")

    assert write_folder_atomic(final, fill) == final
    assert seen[0].parent == tmp_path and seen[0] != final
    assert (final / "sub" / "b.txt").read_text() == "b" and entries(tmp_path) == ["out"]


@pytest.mark.parametrize("failing", ["fill", "rename"])
def test_a_failed_folder_write_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    final = tmp_path / "out"
    write_folder_atomic(final, lambda d: (d / "old.txt").write_text("old"))

    def fill(directory: Path) -> None:
        (directory / "new.txt").write_text("partial")
        if failing == "fill":
            disk_full()

    if failing == "rename":
        real_rename = os.rename

        def rename(source: str | Path, target: str | Path) -> None:
            if Path(target) == final and ".tmp-" in Path(source).name:  # after the old folder moved aside
                disk_full()
            real_rename(source, target)

        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        write_folder_atomic(final, fill)
    assert entries(final) == ["old.txt"] and entries(tmp_path) == ["out"]


def test_destinations_are_refused_unless_empty_or_forced(tmp_path: Path) -> None:
    check_destination(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", force=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(DestinationError, match=r"full already exists and is not empty; pass --force"):
        check_destination(tmp_path / "full", force=False)
    check_destination(tmp_path / "full", force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="exists and is not a directory"):
        check_destination(tmp_path / "file", force=True)
    with pytest.raises(DestinationError, match="would replace its own source"):
        check_destination(tmp_path, force=True, source=tmp_path / "full" / "mine.txt")


def test_every_writer_of_smallm_goes_through_this_module() -> None:
    """No other module opens files for writing, renames or fsyncs by itself (the checkpoint and export
    writers fill folders that this module makes atomic)."""
    package = Path(files.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "files.py":
            continue
        text = path.read_text(encoding="utf-8")
        for call in ("os.replace(", ".rename(", "os.fsync(", "shutil.copyfile(", "tempfile."):
            if call in text:
                offenders.append(f"{path.relative_to(package)}: {call}")
    assert offenders == []
