"""Golden cases on disk: the language-neutral format (docs/SPEC.md, "Golden format").

A case is two files side by side, `<id>.json` and `<id>.safetensors`, where `<id>` is a path such
as `layer/linear_bias_f64`. The JSON holds:

    format       "adalora-ref-golden/1"
    id, kind     the case's path and what it exercises (layer, conv_layer, init, orth, schedule, allocator,
                 trajectory, checkpoint, config, targeting: validate.KINDS)
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
sha256}} listing every regular file under it (dot-files too) except itself. Every file is checked
against it when the directory is loaded; a changed, missing or extra file is an error naming it.
What a well-formed directory, manifest and case are (paths that stay inside the folder, no
symbolic links, every field of a case) is validate.py's; a case that breaks a rule is a CaseError.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from .._files import write_atomically
from .validate import (
    FORMAT,
    KINDS,
    MANIFEST,
    CaseError,
    case_json,
    case_tensors,
    inside,
    manifest_files,
    regular_files,
    require_directory,
)


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
    """One golden case as read: its checks in judging order and the expected value of each."""

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
        """The case's `<id>.json` (the tensors go to `<id>.safetensors`, see `write_case`)."""
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
    """The lowercase hex SHA-256 of a file's bytes, as MANIFEST.json lists it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stored_tensor(value: Any) -> np.ndarray:
    """`value` as a safetensors file holds it: a contiguous array, a scalar as shape (1,)."""
    array = np.asarray(value)
    return np.ascontiguousarray(array.reshape(1) if array.ndim == 0 else array)


def write_case(root: Path, case: Case, extra_files: Mapping[str, bytes] | None = None) -> list[Path]:
    """Write a case's JSON and safetensors (and extra files) under `root`; returns the paths written."""
    base = root / case.id
    tensors = {f"inputs/{k}": np.ascontiguousarray(v) for k, v in case.inputs.items()}
    tensors.update({f"outputs/{c.key}": stored_tensor(case.expected[c.key]) for c in case.checks if c.type == "tensor"})
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
    """List every regular file under `root` (dot-files too), except the manifest, with its sha256."""
    files = {rel: sha256_of(root / rel) for rel in regular_files(root) if rel != MANIFEST}
    manifest = {"format": FORMAT, "provenance": dict(provenance), "files": files}
    write_atomically(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())


def _read_bytes(path: Path, missing: str) -> bytes:
    """A regular file's bytes, else a CaseError naming it (saying `missing` when it does not exist)."""
    try:
        if path.exists() and not path.is_file():  # a folder, or a FIFO or device (reading one could hang)
            raise CaseError(f"{path}: not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise CaseError(f"{path}: {missing}") from None
    except OSError as err:
        raise CaseError(f"{path}: cannot read: {err.strerror}") from None


def read_json(path: Path, missing: str = "missing") -> Any:
    """The JSON value in the file `path` (a case, a manifest, a port's outputs or port.json); any
    reason it cannot be read (`missing` when it does not exist) is a CaseError naming the file."""
    try:
        return json.loads(_read_bytes(path, missing).decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CaseError(f"{path}: not UTF-8 text: {err}") from None
    except RecursionError:
        raise CaseError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, or an integer with more digits than Python converts
        raise CaseError(f"{path}: invalid JSON: {err}") from None


def _read_format_json(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object of this format (a manifest or a case); errors name the file."""
    data = read_json(path, missing)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CaseError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return data


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a case directory, its shape and paths checked, and the files under `root`
    exactly those it lists (no links, nothing extra, nothing missing), each with its sha256."""
    require_directory(root)
    path = inside(root, MANIFEST, str(root))  # a link is refused before it is read
    manifest = _read_format_json(path, f"missing (a case directory needs a {MANIFEST} listing every file)")
    listed = manifest_files(manifest, path)
    present = set(regular_files(root)) - {MANIFEST}
    missing = sorted(set(listed) - present)
    if missing:
        raise CaseError(f"{root / missing[0]}: listed in {MANIFEST} but missing")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise CaseError(f"{root / unlisted[0]}: not listed in {MANIFEST} (add it by regenerating the manifest)")
    for rel, digest in sorted(listed.items()):
        if sha256_of(root / rel) != digest:  # the walk above found no link, the entry has no '..'
            raise CaseError(f"{root / rel}: changed or truncated (sha256 differs from {MANIFEST})")
    return manifest


def case_ids(root: Path) -> list[str]:
    """The ids of the cases under `root`, sorted by kind order then name. Every `.json` file under
    `root` except the manifest and the files inside a case's `<id>.files/` folder is a case, whatever
    its name (a dot-named one too: it is then read, and refused unless it is a well-formed case)."""
    jsons = [rel for rel in regular_files(root) if rel.endswith(".json") and rel != MANIFEST]
    ids = [rel.removesuffix(".json") for rel in jsons if not any(p.endswith(".files") for p in rel.split("/")[:-1])]
    order = {k: n for n, k in enumerate(KINDS)}
    return sorted(ids, key=lambda i: (order.get(i.split("/")[0], len(KINDS)), i))


def read_case(root: Path, case_id: str) -> Case:
    """Load one case, every field checked (validate.py); the manifest is checked by `read_manifest`."""
    require_directory(root)
    json_path = inside(root, f"{case_id}.json", f"{root}: case id")
    st_path = inside(root, f"{case_id}.safetensors", f"{root}: case id")
    meta = _read_format_json(json_path, "no such case")
    case_json(meta, json_path, case_id)
    tensors = read_tensors(st_path)
    case_tensors(meta, tensors, st_path)
    checks = [
        Check(c["key"], c["quantity"], c["type"], c.get("step"), c.get("layer"), _float_or_none(c.get("rtol")))
        for c in meta["checks"]
    ]
    expected = {c.key: tensors[f"outputs/{c.key}"] if c.type == "tensor" else meta["values"][c.key] for c in checks}
    folder = f"{case_id}.files"
    files = {name: inside(root, f"{folder}/{name}", f"{json_path}: files") for name in meta["files"]}
    for name, path in files.items():
        if not path.is_file():
            raise CaseError(f"{json_path}: files: {name!r} is not a file in {folder}/")
    return Case(
        id=meta["id"],
        kind=meta["kind"],
        dtype=meta["dtype"],
        description=meta["description"],
        config=meta["config"],
        inputs={name: tensors[f"inputs/{name}"] for name in meta["inputs"]},
        checks=checks,
        expected=expected,
        margins=meta["margins"],
        provenance=meta["provenance"],
        files=files,
    )


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (a case's, or a port's outputs), by name; errors name the file."""
    data = _read_bytes(path, "missing")
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as err:
        raise CaseError(f"{path}: not a readable safetensors file: {err}") from None


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
