"""The rules a directory of golden cases must meet before anything in it is trusted (docs/SPEC.md 13.2, 13.3).

case.py reads and writes the format; this module says what a well-formed directory, manifest and
case are, so that `adalora-ref conform` refuses what it cannot trust (exit 2, one line naming the
file and the field) rather than running it, following it out of the folder, or crashing on it.

- Paths. Every path a manifest or a case names is relative, `/`-separated, with no empty, `.` or
  `..` component, no backslash and no NUL, and no component from the cases folder down to it is a
  symbolic link. A cases folder holds regular files and folders only: ANY symbolic link under it is
  refused (even one pointing inside), as is a FIFO, socket or device (reading one could hang). The
  folder itself may be reached through a link. With these rules a path cannot leave the folder.
- The manifest: exactly {"format", "provenance": {...}, "files": {path: lowercase hex SHA-256}}.
- The case JSON: every field, its type and range (`case_json`); a case without checks is refused.
- The case tensors: each declared input present with its shape and dtype, each expected tensor
  output present and finite (`case_tensors`).

It reads no file's contents (case.py does) and knows nothing of what a case kind computes.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import is_real

FORMAT = "adalora-ref-golden/1"
MANIFEST = "MANIFEST.json"
KINDS = (
    *("layer", "conv_layer", "init", "orth", "schedule", "allocator", "trajectory", "checkpoint", "config"),
    "targeting",
)
DTYPES = ("float32", "float64")
INPUT_DTYPES = ("float32", "float64", "int64")
MANIFEST_FIELDS = ("format", "provenance", "files")
CASE_FIELDS = (
    *("format", "id", "kind", "dtype", "description", "config", "inputs", "checks", "values", "margins"),
    *("provenance", "files"),
)
CHECK_FIELDS = ("key", "quantity", "type")  # required; step, layer and rtol may be absent (= null)
CHECK_OPTIONAL = ("step", "layer", "rtol")
SHA256 = re.compile(r"[0-9a-f]{64}")
NOT_PLAIN = "a cases folder holds only regular files and folders"


class CaseError(ValueError):
    """A golden case directory or file that cannot be trusted; the message names the file."""


# --- paths ---------------------------------------------------------------------------------------


def relative_path(rel: object, where: str) -> str:
    """`rel` when it is a relative `/` path that cannot leave its folder; else a CaseError at `where`."""
    if not isinstance(rel, str) or not rel:
        raise CaseError(f"{where}: {rel!r} is not a relative path")
    if "\\" in rel or "\0" in rel:
        raise CaseError(f"{where}: {rel!r} contains a backslash or NUL (paths are /-separated)")
    if rel.startswith("/"):
        raise CaseError(f"{where}: {rel!r} is an absolute path (paths are relative to the cases folder)")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise CaseError(f"{where}: {rel!r} has an empty, '.' or '..' component (paths stay inside the cases folder)")
    return rel


def inside(root: Path, rel: object, where: str) -> Path:
    """`root / rel` once `rel` is a safe relative path and nothing from `root` down to it is a link."""
    path = root
    for part in relative_path(rel, where).split("/"):
        path = path / part
        try:
            is_link = path.is_symlink()
        except OSError as err:
            raise CaseError(f"{where}: {rel!r}: {err.strerror}") from None
        if is_link:
            raise CaseError(f"{path}: a symbolic link ({NOT_PLAIN})")
    return path


def require_directory(root: Path) -> None:
    """Refuse a cases folder that is not a directory (a link to one is fine)."""
    if not root.is_dir():
        raise CaseError(f"{root}: is not a directory (a cases folder is a directory with a {MANIFEST})")


def regular_files(root: Path) -> list[str]:
    """Every file under `root` as sorted relative `/` paths; a link or a special file is refused."""
    require_directory(root)
    found, pending = [], [root]
    while pending:
        folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise CaseError(f"{folder}: cannot list: {err.strerror}") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                raise CaseError(f"{path}: a symbolic link ({NOT_PLAIN})")
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.append(path.relative_to(root).as_posix())
            else:
                raise CaseError(f"{path}: not a regular file ({NOT_PLAIN})")
    return sorted(found)


# --- the manifest --------------------------------------------------------------------------------


def _fields(data: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...], where: str) -> None:
    missing = [f for f in required if f not in data]
    if missing:
        raise CaseError(f"{where}: missing field {missing[0]!r}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise CaseError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(required + optional)})")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _found(value: object) -> str:
    """`null`, or a value's type and (shortened) repr, for messages."""
    return "null" if value is None else f"{type(value).__name__} {_short(value)}"


def _require(value: object, kind: type | tuple[type, ...], where: str, expected: str) -> None:
    if not isinstance(value, kind):
        raise CaseError(f"{where}: expected {expected}, found {_found(value)}")


def manifest_files(data: Mapping[str, Any], path: Path) -> dict[str, str]:
    """The `files` of a parsed manifest at `path` ({relative path: sha256}), its shape checked."""
    _fields(data, MANIFEST_FIELDS, (), str(path))
    _require(data["provenance"], dict, f"{path}: provenance", "an object")
    files = data["files"]
    _require(files, dict, f"{path}: files", "an object {relative path: sha256}")
    for rel, digest in files.items():
        relative_path(rel, f"{path}: files entry")
        if rel == MANIFEST:
            raise CaseError(f"{path}: files entry {rel!r}: the manifest does not list itself")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise CaseError(f"{path}: files[{rel!r}]: {_short(digest)} is not a SHA-256 (64 lowercase hex digits)")
    return dict(files)


# --- the case JSON -------------------------------------------------------------------------------


def _number(value: object, where: str, *, allow_inf: bool = False, allow_none: bool = False) -> None:
    """A non-negative number (an int or float, not a bool), finite unless `allow_inf`."""
    if value is None and allow_none:
        return
    ok = False
    if is_real(value):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
        ok = number >= 0 and (allow_inf or math.isfinite(number))
    if not ok:
        what = "a non-negative " + ("number" if allow_inf else "finite number") + (" or null" if allow_none else "")
        raise CaseError(f"{where}: expected {what}, found {_found(value)}")


def _finite_json(value: object) -> bool:
    """No NaN or infinity anywhere in a JSON value (walked without recursion: values nest deep)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def case_json(meta: Mapping[str, Any], path: Path, case_id: str) -> None:
    """Every field of the case JSON read from `path` (as case `case_id`); errors name file and field."""
    at = f"{path}: "
    _fields(meta, CASE_FIELDS, (), str(path))
    if meta["id"] != case_id:
        raise CaseError(f"{at}id: {_short(meta['id'])}, but the file is {case_id}.json (the id is the case's path)")
    if not isinstance(meta["kind"], str) or meta["kind"] not in KINDS:
        raise CaseError(f"{at}kind: {_short(meta['kind'])} is not one of {', '.join(KINDS)}")
    if case_id.split("/")[0] != meta["kind"]:
        raise CaseError(f"{at}id: {case_id!r} is not in its kind's folder {meta['kind']}/")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise CaseError(f"{at}dtype: {_short(meta['dtype'])} is not one of {', '.join(DTYPES)}")
    _require(meta["description"], str, f"{at}description", "a string")
    for name in ("config", "provenance", "inputs", "values", "margins"):
        _require(meta[name], dict, f"{at}{name}", "an object")
    for name, spec in meta["inputs"].items():
        where = f"{at}inputs[{name!r}]"
        _require(spec, dict, where, 'an object {"shape": [...], "dtype": ...}')
        _fields(spec, ("shape", "dtype"), (), where)
        shape = spec["shape"]
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise CaseError(f"{where}.shape: expected a list of non-negative integers, found {_short(shape)}")
        if not isinstance(spec["dtype"], str) or spec["dtype"] not in INPUT_DTYPES:
            raise CaseError(f"{where}.dtype: {_short(spec['dtype'])} is not one of {', '.join(INPUT_DTYPES)}")
    _checks(meta, at)
    for label, margin in meta["margins"].items():
        _number(margin, f"{at}margins[{label!r}]", allow_inf=True)
    files = meta["files"]
    _require(files, list, f"{at}files", "a list of file names")
    for i, name in enumerate(files):
        if "/" in relative_path(name, f"{at}files[{i}]"):
            raise CaseError(f"{at}files[{i}]: {name!r} is not a plain file name (no '/'; it lies in {case_id}.files/)")
    if len(set(files)) != len(files):
        raise CaseError(f"{at}files: a name is listed twice")


def _checks(meta: Mapping[str, Any], at: str) -> None:
    checks = meta["checks"]
    _require(checks, list, f"{at}checks", "a list of checks")
    if not checks:
        raise CaseError(f"{at}checks: empty (a case without checks would pass without judging anything)")
    keys: set[str] = set()
    for i, check in enumerate(checks):
        where = f"{at}checks[{i}]"
        _require(check, dict, where, "an object")
        _fields(check, CHECK_FIELDS, CHECK_OPTIONAL, where)
        for name in ("key", "quantity"):
            if not isinstance(check[name], str) or not check[name]:
                raise CaseError(f"{where}.{name}: expected a non-empty string, found {_short(check[name])}")
        if check["key"] in keys:
            raise CaseError(f"{where}.key: {check['key']!r} is already the key of an earlier check")
        keys.add(check["key"])
        if not isinstance(check["type"], str) or check["type"] not in ("tensor", "exact"):
            raise CaseError(f'{where}.type: {_short(check["type"])} is not "tensor" or "exact"')
        step = check.get("step")
        if step is not None and (type(step) is not int or step < 0):
            raise CaseError(f"{where}.step: expected a non-negative integer or null, found {_short(step)}")
        _require(check.get("layer"), (str, type(None)), f"{where}.layer", "a string or null")
        _number(check.get("rtol"), f"{where}.rtol", allow_none=True)
    exact = {c["key"] for c in checks if c["type"] == "exact"}
    values = meta["values"]
    missing, extra = sorted(exact - set(values)), sorted(set(values) - exact)
    if missing:
        raise CaseError(f"{at}values: no entry for the exact check {missing[0]!r}")
    if extra:
        raise CaseError(f"{at}values[{extra[0]!r}]: no exact check has this key")
    for key, value in values.items():
        if not _finite_json(value):
            raise CaseError(f"{at}values[{key!r}]: holds NaN or infinity (expected values are finite)")


# --- the case tensors ----------------------------------------------------------------------------


def case_tensors(meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """The tensors of a case (read from `path`) against its validated JSON `meta`."""
    for name, spec in meta["inputs"].items():
        tensor = _tensor(tensors, f"inputs/{name}", path)
        if list(tensor.shape) != spec["shape"]:
            raise CaseError(f"{path}: inputs/{name} has shape {list(tensor.shape)}, the case says {spec['shape']}")
        if str(tensor.dtype) != spec["dtype"]:
            raise CaseError(f"{path}: inputs/{name} has dtype {tensor.dtype}, the case says {spec['dtype']}")
    for check in meta["checks"]:
        if check["type"] == "tensor":
            tensor = _tensor(tensors, f"outputs/{check['key']}", path)
            if np.issubdtype(tensor.dtype, np.floating) and not np.all(np.isfinite(tensor)):
                raise CaseError(f"{path}: outputs/{check['key']} holds NaN or infinity (expected outputs are finite)")


def _tensor(tensors: Mapping[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in tensors:
        raise CaseError(f"{path}: missing tensor {key}")
    return tensors[key]
