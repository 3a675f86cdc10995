"""Reading a port's outputs for a case, and what a port declares about itself (docs/SPEC.md, section 15).

For the case `<id>` (e.g. `allocator/phases_64`) a port writes, under its output directory:

    <id>.safetensors   tensors named by the check keys (e.g. `step3.ipt.q.lora_A`), and/or
    <id>.json          {"values": {key: value}} for exact checks (budgets, flags, rank patterns),
                       and, if the port prefers, tensors too: a number, nested lists of numbers,
                       or {"shape": [...], "data": [...]} (the only JSON form of a zero-size tensor)
    port.json          optional: {"unsupported": {"<case id glob>": "<reason>"}}, the cases the
                       port cannot run, reported as "unsupported" with the reason, not as failures

A key may appear in either file; one the port did not write is reported as missing.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors_bytes

from .._backend import is_integer, is_real
from .._files import write_atomically
from .case import Case, CaseError, read_json, read_tensors, stored_tensor

PORT_JSON = "port.json"


def read_port_outputs(port_dir: Path, case: Case) -> dict[str, Any]:
    """What the port wrote for `case` under `port_dir`, key -> value: tensors (from either file) as
    arrays, exact values as the JSON holds them. No file at all is a CaseError that says so."""
    base = port_dir / case.id
    json_path, st_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not json_path.is_file() and not st_path.is_file():
        raise CaseError(
            f"no outputs for this case: expected {json_path} and/or {st_path} "
            f"(declare it in {port_dir / PORT_JSON} if your port cannot run it)"
        )
    outputs: dict[str, Any] = {}
    if st_path.is_file():
        outputs.update(read_tensors(st_path))
    if json_path.is_file():
        data = read_json(json_path)
        if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
            raise CaseError(f'{json_path}: expected an object {{"values": {{key: value}}}}')
        tensor_keys = {c.key for c in case.checks if c.type == "tensor"}
        for key, value in data["values"].items():
            outputs[key] = json_tensor(value, f"{json_path}: values[{key!r}]") if key in tensor_keys else value
    return outputs


def json_tensor(value: Any, where: str) -> np.ndarray:
    """A tensor written in JSON: a number, (nested) lists of numbers, or {"shape": [...], "data": [...]}.

    In the object form `data` is flat (row-major, `prod(shape)` numbers) or nested exactly as `shape`;
    it is the only way to write a zero-size tensor such as shape `(0, 6)` in JSON.
    """
    if isinstance(value, dict):
        if set(value) != {"shape", "data"}:
            raise CaseError(f'{where}: a tensor object has exactly the keys "shape" and "data", got {sorted(value)}')
        shape = value["shape"]
        if not isinstance(shape, list) or not all(is_integer(n) for n in shape):
            raise CaseError(f"{where}: shape must be a list of integers, got {shape!r}")
        if any(n < 0 for n in shape):
            raise CaseError(f"{where}: shape {shape} has a negative size")
        data = _numbers(value["data"], f"{where}.data")
        if data.ndim == 1 and data.size == math.prod(shape):
            return data.reshape(shape)
        if list(data.shape) != shape:
            raise CaseError(f"{where}: data has shape {list(data.shape)} ({data.size} numbers), shape says {shape}")
        return data
    return _numbers(value, where)


def _numbers(value: Any, where: str) -> np.ndarray:
    """A number or rectangular nested lists of numbers as float64 (booleans, strings and null refused)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))  # the first offending item in reading order
        elif not is_real(item):
            raise CaseError(f"{where}: expected numbers, found {json.dumps(item)}")
    try:
        return np.asarray(value, dtype=np.float64)
    except ValueError:  # ragged nested lists
        raise CaseError(f"{where}: nested lists of unequal lengths (not a tensor)") from None


def read_unsupported(port_dir: Path) -> dict[str, str]:
    """`port.json`'s {case id glob: reason}; {} when the port has no port.json. Errors name the field."""
    path = port_dir / PORT_JSON
    if not path.exists():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise CaseError(f'{path}: expected an object {{"unsupported": {{"<case id glob>": "<reason>"}}}}')
    unknown = sorted(set(data) - {"unsupported"})
    if unknown:
        raise CaseError(f'{path}: unknown key {unknown[0]!r} (the only key is "unsupported")')
    declared = data.get("unsupported", {})
    if not isinstance(declared, dict):
        raise CaseError(f'{path}: "unsupported" must be an object {{"<case id glob>": "<reason>"}}')
    for glob, reason in declared.items():
        if not glob.strip():
            raise CaseError(f'{path}: "unsupported" has an empty case id glob')
        if not isinstance(reason, str) or not reason.strip():
            raise CaseError(f"{path}: unsupported[{glob!r}] must be a non-empty reason string, got {reason!r}")
    return declared


def unsupported_reason(case_id: str, declared: Mapping[str, str]) -> str | None:
    """The reason of the first glob (in port.json's order) that matches `case_id`, else None."""
    return next((reason for glob, reason in declared.items() if fnmatch.fnmatchcase(case_id, glob)), None)


def unmatched_globs(declared: Mapping[str, str], ids: Iterable[str]) -> list[str]:
    """The globs of port.json that match none of `ids` (most likely a typo)."""
    ids = list(ids)
    return [glob for glob in declared if not any(fnmatch.fnmatchcase(i, glob) for i in ids)]


def write_port_outputs(port_dir: Path, case: Case, outputs: dict[str, Any]) -> None:
    """Write the outputs the case checks, in the port format (used by tests; an example for port authors)."""
    tensor_keys = {c.key for c in case.checks if c.type == "tensor"}
    tensors = {k: stored_tensor(v) for k, v in outputs.items() if k in tensor_keys}
    exact_keys = {c.key for c in case.checks if c.type == "exact"}
    values = {k: v for k, v in outputs.items() if k in exact_keys}
    base = port_dir / case.id
    if tensors:
        write_atomically(base.with_suffix(".safetensors"), save_safetensors_bytes(tensors))
    write_atomically(base.with_suffix(".json"), (json.dumps({"values": values}, indent=1) + "\n").encode())
