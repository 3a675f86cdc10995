"""Writing files so that a crash never leaves half of one: the only module that renames files.

Every file the project writes for a user (reports, port outputs, golden cases, checkpoint files)
goes through `write_atomically`: the bytes go to a temporary file beside the target, are flushed to
disk, and the temporary file then takes the target's name in one `os.replace`. A reader sees the
old file or the new one, never a mix. New files get the permissions the user's umask gives (as
`open()` would), not the 0600 of `tempfile.mkstemp`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

TEMP_MARK = ".tmp-"  # temporary files are named `.<target name>.tmp-<random>`


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its directory is)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, flushed to disk; mode from the umask.

    Plain `os` calls only (open, write, fsync, close), so that tests can fail each one in turn.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:  # a failed close too (EIO: the data may not have reached the disk)
        path.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: never a half-written file.

    Creates missing parent directories. On any failure the temporary file is removed and `path`
    is as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}")
    write_new_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
