"""adalora_ref._files.write_atomically under faults: each os call it makes fails in turn, and after
each the target holds its old bytes whole and no temporary file is left beside it."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from adalora_ref._files import TEMP_MARK, write_atomically

CALLS = ("open", "write", "fsync", "close", "replace")


def failing(name: str, real: Callable[..., object]) -> Callable[..., object]:
    """`real`, except that its first call raises EIO: after doing its work (a write that wrote, a close
    that closed, a rename that renamed: the worst case for whoever cleans up), except for open, which
    fails without creating the file."""
    failed: list[bool] = []

    def call(*args: object, **kwargs: object) -> object:
        if failed:
            return real(*args, **kwargs)
        failed.append(True)
        if name != "open":
            real(*args, **kwargs)
        raise OSError(errno.EIO, f"injected failure of os.{name}")

    return call


@pytest.mark.parametrize("name", CALLS)
def test_a_failing_os_call_leaves_the_old_file_whole_and_no_temporary_file(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "report.json"
    target.write_bytes(b"old")
    monkeypatch.setattr(os, name, failing(name, getattr(os, name)))
    with pytest.raises(OSError, match=f"injected failure of os.{name}"):
        write_atomically(target, b"new contents")
    monkeypatch.undo()
    if name == "replace":  # the rename itself happened: the new file is there, whole
        assert target.read_bytes() == b"new contents"
    else:
        assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], [p.name for p in tmp_path.iterdir()]
    assert not any(TEMP_MARK in p.name for p in tmp_path.iterdir())


def test_a_new_file_gets_the_umask_mode_and_missing_folders_are_made(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomically(tmp_path / "a" / "b" / "out.bin", b"\x00\x01")
    finally:
        os.umask(old)
    path = tmp_path / "a" / "b" / "out.bin"
    assert path.read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o640
