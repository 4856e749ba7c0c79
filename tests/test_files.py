"""Writing to disk: atomic files and folders keep what was there when a write fails, sync what they write,
and the one rule for destinations: nothing is replaced without force, force replaces only what that kind
of command wrote, and a command never writes over its own input or what another process holds."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import smallm
from smallm.files.atomic import (
    copy_file_atomic,
    write_bytes_atomic,
    write_entries_atomic,
    write_folder_atomic,
    write_json_atomic,
)
from smallm.files.destination import Artifact, DestinationError, claim
from smallm.files.lock import Lock


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


def folder_of_kind(path: Path) -> bool:
    return (path / "made.txt").is_file()


MADE = Artifact("a made folder", folder_of_kind, ("made.txt", "part-*.bin"))


def test_a_destination_holding_anything_is_refused_without_force(tmp_path: Path) -> None:
    claim(tmp_path / "new", MADE, force=False, command="make").release()
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", MADE, force=False, command="make").release()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(DestinationError, match=r"full holds mine.txt, which make did not write.*--force"):
        claim(tmp_path / "full", MADE, force=False, command="make")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="is a file; make writes a folder"):
        claim(tmp_path / "file", MADE, force=True, command="make")


def test_force_replaces_only_what_this_kind_wrote_and_keeps_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name, text in (("made.txt", "old"), ("part-1.bin", "old"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    with pytest.raises(DestinationError, match=r"already holds a made folder \(made.txt, part-1.bin, beside notes"):
        claim(out, MADE, force=False, command="make")
    with claim(out, MADE, force=True, command="make") as destination:
        assert destination.own == ["made.txt", "part-1.bin"] and destination.kept == ["notes.txt"]
        destination.write_folder(lambda folder: (folder / "made.txt").write_text("new"))
    assert entries(out) == ["made.txt", "notes.txt"]
    assert (out / "made.txt").read_text() == "new" and (out / "notes.txt").read_text() == "mine"


def test_force_never_writes_over_a_name_another_kind_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-1.bin").write_text("someone else's")  # the name is ours, the folder is not of our kind
    with pytest.raises(DestinationError, match=r"holds part-1.bin, which make would write but which are not part"):
        claim(out, MADE, force=True, command="make")
    assert (out / "part-1.bin").read_text() == "someone else's"


def test_a_destination_is_never_its_own_input_either_way(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for out, relation in ((data, "is"), (data / "sub", "lies inside"), (tmp_path, "holds")):
        with pytest.raises(DestinationError, match=f"{relation} the command's own input"):
            claim(out, MADE, force=True, command="make", inputs=[data])


def test_a_destination_another_process_holds_is_refused_even_with_force(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with Lock(out, "smallm-train"):
        for place in (out, out / "inner"):
            with pytest.raises(DestinationError, match=rf"in use by smallm-train \(process {os.getpid()}"):
                claim(place, MADE, force=True, command="make")


def test_a_file_destination_is_replaced_only_when_it_is_this_kinds_output(tmp_path: Path) -> None:
    kind = Artifact("a made file", lambda path: path.read_text().startswith("MADE"))
    ours, theirs = tmp_path / "ours.txt", tmp_path / "theirs.txt"
    ours.write_text("MADE 1")
    theirs.write_text("prompts")
    with pytest.raises(DestinationError, match="already holds a made file; pass --force"):
        claim(ours, kind, force=False, command="make")
    with claim(ours, kind, force=True, command="make") as destination:
        destination.write_file(lambda path: path.write_text("MADE 2"))
    assert ours.read_text() == "MADE 2"
    with pytest.raises(DestinationError, match="is not a made file; make never replaces it, even with --force"):
        claim(theirs, kind, force=True, command="make")
    assert theirs.read_text() == "prompts"


def test_replacing_entries_beside_kept_ones_puts_everything_back_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "made.txt").write_text("old")
    (out / "notes.txt").write_text("mine")

    def fill(folder: Path) -> None:
        (folder / "made.txt").write_text("new")
        (folder / "part-1.bin").write_text("new")

    real_rename = os.rename

    def rename_then_fail(source: object, target: object) -> None:
        if str(target).endswith("part-1.bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rename(source, target)

    os.rename = rename_then_fail  # type: ignore[assignment]
    try:
        with pytest.raises(OSError, match="No space left"):
            write_entries_atomic(out, fill, ["made.txt"])
    finally:
        os.rename = real_rename
    assert entries(out) == ["made.txt", "notes.txt"] and (out / "made.txt").read_text() == "old"
    assert entries(tmp_path) == ["out"]


def test_every_writer_of_smallm_goes_through_this_module() -> None:
    """No other module opens files for writing, renames or fsyncs by itself (the checkpoint and export
    writers fill folders that this module makes atomic)."""
    package = Path(smallm.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if path.parent.name == "files":
            continue
        text = path.read_text(encoding="utf-8")
        for call in ("os.replace(", ".rename(", "os.fsync(", "shutil.copyfile(", "tempfile."):
            if call in text:
                offenders.append(f"{path.relative_to(package)}: {call}")
    assert offenders == []
