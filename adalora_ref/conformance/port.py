"""Reading a port's outputs for a case (docs/SPEC.md, "Writing a port's outputs").

For the case `<id>` (e.g. `allocator/phases_64`) a port writes, under its output directory:

    <id>.safetensors   tensors named by the check keys (e.g. `step3.ipt.q.lora_A`), and/or
    <id>.json          {"values": {key: value}} for exact checks (budgets, flags, rank patterns),
                       and, if the port prefers, tensors too, as nested lists of numbers

A key may appear in either file; one the port did not write is reported as missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from .case import Case, CaseError, read_tensors, write_atomically


def read_port_outputs(port_dir: Path, case: Case) -> dict[str, Any]:
    base = port_dir / case.id
    json_path, st_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
    if not json_path.is_file() and not st_path.is_file():
        raise CaseError(f"no outputs for this case: expected {json_path} and/or {st_path}")
    outputs: dict[str, Any] = {}
    if st_path.is_file():
        outputs.update(read_tensors(st_path))
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
        except json.JSONDecodeError as err:
            raise CaseError(f"{json_path}: invalid JSON: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("values"), dict):
            raise CaseError(f'{json_path}: expected an object {{"values": {{key: value}}}}')
        tensor_keys = {c.key for c in case.checks if c.type == "tensor"}
        for key, value in data["values"].items():
            outputs[key] = np.asarray(value, dtype=np.float64) if key in tensor_keys else value
    return outputs


def write_port_outputs(port_dir: Path, case: Case, outputs: dict[str, Any]) -> None:
    """Write the outputs the case checks, in the port format (used by tests; an example for port authors)."""
    tensor_keys = {c.key for c in case.checks if c.type == "tensor"}
    tensors = {}
    for k, v in outputs.items():
        if k in tensor_keys:
            array = np.asarray(v)
            tensors[k] = np.ascontiguousarray(array.reshape(1) if array.ndim == 0 else array)
    exact_keys = {c.key for c in case.checks if c.type == "exact"}
    values = {k: v for k, v in outputs.items() if k in exact_keys}
    base = port_dir / case.id
    base.parent.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file(tensors, str(base.with_suffix(".safetensors")))
    write_atomically(base.with_suffix(".json"), (json.dumps({"values": values}, indent=1) + "\n").encode())
