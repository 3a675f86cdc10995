"""Golden cases on disk: the language-neutral format (docs/SPEC.md, "Golden format").

A case is two files side by side, `<id>.json` and `<id>.safetensors`, where `<id>` is a path such
as `layer/linear_bias_f64`. The JSON holds:

    format       "adalora-ref-golden/1"
    id, kind     the case's path and what it exercises (layer, conv_layer, init, orth, schedule, allocator,
                 trajectory, checkpoint, config)
    dtype        "float32" or "float64": the dtype every float input and output has
    description  one sentence
    config       the kind's parameters (shapes, hyperparameters, schedule, ...)
    inputs       {name: {"shape": [...], "dtype": "..."}} for tensors stored as `inputs/<name>`
    checks       the outputs, IN THE ORDER a port should be judged: a list of
                 {"key", "quantity", "step", "layer", "type", "rtol"}; type "tensor" is compared
                 numerically (stored as `outputs/<key>` in the safetensors file), type "exact" is a
                 JSON value compared for equality (stored in "values" below)
    values       {key: JSON value} for the exact checks
    margins      {label: number}: how far each discrete decision (a mask, a threshold) sat from
                 flipping, relative to the scores' scale
    provenance   versions of peft, torch, numpy, Python, and the seed that produced the case
    files        extra files of the case (a checkpoint case carries peft's saved adapter)

A directory of cases has a `MANIFEST.json`: {"format", "provenance", "files": {relative path:
sha256}}. Every file is checked against it when a case is loaded; a changed, missing or extra
file is an error naming it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from .._files import write_atomically

FORMAT = "adalora-ref-golden/1"
MANIFEST = "MANIFEST.json"
KINDS = ("layer", "conv_layer", "init", "orth", "schedule", "allocator", "trajectory", "checkpoint", "config")


@dataclass
class Check:
    """One output to compare: a tensor (numerically, to `rtol`) or a JSON value (exactly)."""

    key: str
    quantity: str
    type: str  # "tensor" or "exact"
    step: int | None = None
    layer: str | None = None
    rtol: float | None = None

    def where(self) -> str:
        """`budget at step 12`, `ipt of fc1.lora_A at step 3`, ... for messages."""
        text = self.quantity
        if self.layer is not None:
            text += f" of {self.layer}"
        if self.step is not None:
            text += f" at step {self.step}"
        return text


@dataclass
class Case:
    id: str
    kind: str
    dtype: str
    description: str
    config: dict[str, Any]
    inputs: dict[str, np.ndarray]
    checks: list[Check]
    expected: dict[str, Any]  # key -> np.ndarray (tensor checks) or JSON value (exact checks)
    margins: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # name -> path of the case's extra files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "kind": self.kind,
            "dtype": self.dtype,
            "description": self.description,
            "config": self.config,
            "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in self.inputs.items()},
            "checks": [_check_json(c) for c in self.checks],
            "values": {c.key: self.expected[c.key] for c in self.checks if c.type == "exact"},
            "margins": self.margins,
            "provenance": self.provenance,
            "files": sorted(self.files),
        }


def _check_json(c: Check) -> dict[str, Any]:
    return {"key": c.key, "quantity": c.quantity, "type": c.type, "step": c.step, "layer": c.layer, "rtol": c.rtol}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_case(root: Path, case: Case, extra_files: Mapping[str, bytes] | None = None) -> list[Path]:
    """Write a case's JSON and safetensors (and extra files) under `root`; returns the paths written."""
    base = root / case.id
    tensors = {f"inputs/{k}": np.ascontiguousarray(v) for k, v in case.inputs.items()}
    for c in case.checks:
        if c.type == "tensor":
            value = np.asarray(case.expected[c.key])
            tensors[f"outputs/{c.key}"] = np.ascontiguousarray(value.reshape(1) if value.ndim == 0 else value)
    written = []
    extra = dict(extra_files or {})
    case.files = {name: base.parent / f"{base.name}.files" / name for name in extra}
    for name, data in sorted(extra.items()):
        write_atomically(case.files[name], data)
        written.append(case.files[name])
    write_atomically(base.with_suffix(".safetensors"), save_safetensors_bytes(tensors))
    text = json.dumps(case.to_json(), indent=1, sort_keys=True, allow_nan=True) + "\n"
    write_atomically(base.with_suffix(".json"), text.encode())
    return [*written, base.with_suffix(".safetensors"), base.with_suffix(".json")]


def write_manifest(root: Path, provenance: Mapping[str, Any]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    manifest = {
        "format": FORMAT,
        "provenance": dict(provenance),
        "files": {p.relative_to(root).as_posix(): sha256_of(p) for p in files},
    }
    write_atomically(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


class CaseError(ValueError):
    """A golden case directory or file that cannot be trusted; the message names the file."""


def _read_format_json(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object of this format (a manifest or a case); errors name the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: {missing}") from None
    except json.JSONDecodeError as err:
        raise CaseError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CaseError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return data


def read_manifest(root: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a case directory; with `verify`, every file's sha256 is checked against it."""
    path = root / MANIFEST
    manifest = _read_format_json(path, f"missing (a case directory needs a {MANIFEST} listing every file)")
    if verify:
        listed = manifest["files"]
        for rel, digest in sorted(listed.items()):
            file = root / rel
            if not file.is_file():
                raise CaseError(f"{file}: listed in {MANIFEST} but missing")
            if sha256_of(file) != digest:
                raise CaseError(f"{file}: changed or truncated (sha256 differs from {MANIFEST})")
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
        unlisted = sorted(p for p in present - set(listed) if not Path(p).name.startswith("."))
        if unlisted:
            raise CaseError(f"{root / unlisted[0]}: not listed in {MANIFEST} (add it by regenerating the manifest)")
    return manifest


def case_ids(root: Path) -> list[str]:
    """The ids of the cases under `root`, sorted by kind order then name."""
    ids = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.json") if p.name != MANIFEST]
    ids = [i for i in ids if not i.startswith(".") and ".files/" not in i]
    order = {k: n for n, k in enumerate(KINDS)}
    return sorted(ids, key=lambda i: (order.get(i.split("/")[0], len(KINDS)), i))


def read_case(root: Path, case_id: str) -> Case:
    """Load one case (the manifest is checked separately, by `read_manifest`)."""
    json_path = (root / case_id).with_suffix(".json")
    st_path = (root / case_id).with_suffix(".safetensors")
    meta = _read_format_json(json_path, "no such case")
    tensors = read_tensors(st_path)
    inputs = {}
    for name, spec in meta["inputs"].items():
        key = f"inputs/{name}"
        if key not in tensors:
            raise CaseError(f"{st_path}: missing tensor {key}")
        if list(tensors[key].shape) != spec["shape"]:
            raise CaseError(f"{st_path}: {key} has shape {list(tensors[key].shape)}, the case says {spec['shape']}")
        inputs[name] = tensors[key]
    checks = [Check(**c) for c in meta["checks"]]
    expected: dict[str, Any] = {}
    for c in checks:
        if c.type == "tensor":
            key = f"outputs/{c.key}"
            if key not in tensors:
                raise CaseError(f"{st_path}: missing tensor {key}")
            expected[c.key] = tensors[key]
        else:
            if c.key not in meta["values"]:
                raise CaseError(f"{json_path}: values has no entry {c.key!r}")
            expected[c.key] = meta["values"][c.key]
    files = {name: json_path.parent / f"{json_path.stem}.files" / name for name in meta.get("files", [])}
    return Case(
        id=meta["id"],
        kind=meta["kind"],
        dtype=meta["dtype"],
        description=meta["description"],
        config=meta["config"],
        inputs=inputs,
        checks=checks,
        expected=expected,
        margins=meta.get("margins", {}),
        provenance=meta.get("provenance", {}),
        files=files,
    )


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise CaseError(f"{path}: missing") from None
    except (SafetensorError, ValueError) as err:
        raise CaseError(f"{path}: not a readable safetensors file: {err}") from None


def iter_cases(root: Path, *, verify: bool = True) -> Iterator[Case]:
    read_manifest(root, verify=verify)
    for case_id in case_ids(root):
        yield read_case(root, case_id)


def bundled_cases_dir() -> Path:
    """The golden cases shipped with adalora-ref: `golden/cases` in a source checkout, else the
    copy installed as package data `adalora_ref/golden_cases`."""
    source = Path(__file__).resolve().parents[2] / "golden" / "cases"
    if (source / MANIFEST).is_file():
        return source
    installed = Path(__file__).resolve().parents[1] / "golden_cases"
    if (installed / MANIFEST).is_file():
        return installed
    raise CaseError(f"no bundled golden cases found (looked in {source} and {installed})")
