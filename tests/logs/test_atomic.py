"""guardian.logs.atomic.write_atomic: whole content or nothing, no temporary file left behind, the mode asked for."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guardian.logs import atomic
from guardian.logs.atomic import write_atomic


def test_writes_text_and_bytes_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "first\n")
    assert path.read_text() == "first\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_mode_is_0600_by_default_and_the_umask_default_with_none(tmp_path: Path) -> None:
    write_atomic(tmp_path / "private", "x")
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o600
    write_atomic(tmp_path / "shared", "x", mode=0o644)
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o644
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "plain", "x", mode=None)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


def test_an_error_leaves_the_old_content_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mark"
    path.write_text("old")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mark"]


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(tmp_path / "mark", "new")
    assert list(tmp_path.iterdir()) == []


def test_no_overwrite_keeps_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write_atomic(path, "mine", overwrite=False)
    with pytest.raises(FileExistsError):
        write_atomic(path, "theirs", overwrite=False)
    assert path.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_the_data_is_fsynced_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    write_atomic(tmp_path / "f", "x")
    assert calls == ["fsync", "replace", "fsync"]
