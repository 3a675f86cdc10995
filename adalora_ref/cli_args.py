"""The argument checks the `adalora-ref` commands share, so that every bad option is refused alike.

A command's error is one line, `adalora-ref <command>: error: ...`, naming the option and the
value, with exit status 2, and it comes before the long work (training, timing) starts. This
module owns:

- argparse `type=` functions: `int_at_least(n)` and its two common cases `non_negative_int`
  (seeds: NumPy's random generators refuse negative ones) and `positive_int`; `non_negative_float`
  (finite); `writable_file` (an output file such as `--json FILE`) and `usable_directory` (an
  output folder such as `--plot DIR`), both checked by creating and removing a probe file where the
  output will go, which is the only test that tells the truth for root, read-only mounts and /proc;
- `load_backend(parser, name)`: the array library of `--backend`, or the one-line refusal with
  how to install it;
- `write_output(parser, option, path, data)`: write a file the user asked for (atomically, through
  `_files.write_atomically`), turning an OSError at the end of a run (a full disk, a folder removed
  meanwhile) into one line naming the option, the file and the OS error, exit 2, no traceback and
  no half-written file.

It does not own the commands' own options or their cross-field checks (each command's module does).
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._backend import get_backend
from ._files import TEMP_MARK, write_atomically

INSTALL_HINTS = {
    "torch": "install it with `pip install 'adalora-ref[golden]'` (torch and peft)",
    "array_api_strict": "install it with `pip install array-api-strict`",
    "cupy": "CuPy needs an NVIDIA GPU and `pip install 'adalora-ref[gpu]'`",
}


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space: an error stays one line."""
    return " ".join(text.split())


def os_error_text(err: OSError) -> str:
    """`[Errno 28] No space left on device`: the OS error without the temporary file's name."""
    if err.errno is not None and err.strerror:
        return f"[Errno {err.errno}] {err.strerror}"
    return one_line(str(err))


# -- argparse type= functions ---------------------------------------------------------------------
# Each raises argparse.ArgumentTypeError, which argparse prints as `argument --opt: <message>`.


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else `must be an integer >= minimum, got '...'`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


non_negative_int = int_at_least(0)
"""An argparse type for seeds and counts that may be 0: an integer >= 0."""

positive_int = int_at_least(1)
"""An argparse type for counts that must be at least 1: an integer >= 1."""


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (NaN and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (0.0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest ancestor that does (where missing folders would be made)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable_in(folder: Path, name: str, shown: str) -> None:
    """Raise ArgumentTypeError unless a file `name` can be created in `folder` (made first if missing).

    Probes the nearest folder that exists by creating and removing a file there, named like
    write_atomically's temporaries: creating a missing subfolder needs the same right.
    """
    home = _nearest_existing(folder)
    if not os.path.isdir(home):
        raise argparse.ArgumentTypeError(f"cannot write {shown}: {home} is not a directory")
    probe = home / f".{name}{TEMP_MARK}probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot write {shown}: cannot create files in {home}: {os_error_text(err)}"
        ) from None


def writable_file(text: str) -> Path:
    """An argparse type for an output file (`--json FILE`): the file can be written there.

    The file may exist (it is replaced whole) but must then be a regular file; missing folders above
    it must be creatable (write_atomically creates them). The check leaves nothing behind.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got ''")
    path = Path(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it is a directory")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"cannot write {text}: it exists and is not a regular file")
    _check_creatable_in(path.parent, path.name, text)
    return path


def usable_directory(text: str) -> Path:
    """An argparse type for an output folder (`--plot DIR`): files can be written in it.

    The folder may exist (it must then accept new files) or not (the folders missing must then be
    creatable). It is not created by the check: a refused run leaves nothing behind.
    """
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got ''")
    path = Path(text)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot write into {text}: it is not a directory")
    _check_creatable_in(path, "output", text)
    return path


# -- checks that need the parser -----------------------------------------------------------------


def load_backend(parser: argparse.ArgumentParser, name: str) -> Any:
    """The array API namespace of `--backend name`, or exit 2 with one line saying why it cannot run here."""
    try:
        return get_backend(name)
    except ImportError as err:
        hint = f" ({INSTALL_HINTS[name]})" if name in INSTALL_HINTS else ""
        parser.error(f"--backend {name} cannot run here: {one_line(str(err))}{hint}")


def write_output(parser: argparse.ArgumentParser, option: str, path: Path, data: bytes) -> None:
    """Write `data` to `path` for `option`, atomically; an OSError exits 2 with one line, no traceback.

    The line is `<prog>: error: <option>: cannot write <path>: [Errno N] <reason>`; write_atomically
    removes its temporary file, so no half-written file is left and an older `path` is kept whole.
    """
    try:
        write_atomically(path, data)
    except OSError as err:
        parser.exit(2, f"{parser.prog}: error: {option}: cannot write {path}: {os_error_text(err)}\n")
