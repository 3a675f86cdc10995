"""The golden suite's integrity: a cases folder is trusted only when every file in it is listed in its
manifest with its SHA-256, every path stays inside it, and every case is well formed; anything else is
a CaseError naming the file and the field (exit 2 from `adalora-ref conform`), never a traceback, a
file read from elsewhere, or a case that passes without being judged. (The fuzzing of the same
readers is in tests/test_case_fuzz.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adalora_ref.cli import main
from adalora_ref.conformance.case import (
    MANIFEST,
    CaseError,
    bundled_cases_dir,
    case_ids,
    read_case,
    read_manifest,
    write_manifest,
)

CASES = bundled_cases_dir()
PROVENANCE = json.loads((CASES / MANIFEST).read_text())["provenance"]


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(CASES, tmp_path / "cases"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_json(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_case(root: Path, case_id: str, change: Callable[[dict[str, Any]], object]) -> Path:
    """Change a case's JSON and re-list the folder, so that only the case's own rules can refuse it."""
    path = root / f"{case_id}.json"
    edit_json(path, change)
    write_manifest(root, PROVENANCE)
    return path


def refuse(capsys: pytest.CaptureFixture[str], root: Path, *fragments: str, kind: str | None = None) -> str:
    """`adalora-ref conform --cases root [--kind kind]` exits 2 with one line naming every fragment."""
    capsys.readouterr()
    assert main(["conform", "--cases", str(root), *(["--kind", kind] if kind else [])]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("adalora-ref conform: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# --- opening files: an audit hook records every open() while a recorder is active ---------------

_recorder: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _recorder is not None and isinstance(args[0], str | bytes | os.PathLike):
        _recorder.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only inside `opened_outside`


@contextmanager
def opened_outside(root: Path) -> Iterator[tuple[list[str], list[str]]]:
    """(files opened outside `root`, files opened inside it) while the block runs."""
    global _recorder
    recorded: list[str] = []
    outside: list[str] = []
    inside: list[str] = []
    _recorder = recorded
    try:
        yield outside, inside
    finally:
        _recorder = None
        base = root.resolve()
        for name in recorded:
            (inside if Path(name).resolve().is_relative_to(base) else outside).append(name)


def test_a_full_conform_opens_no_file_outside_the_cases_folder(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A first run imports what the cases need (module files); the second opens only the folder's files."""
    assert main(["conform", "--cases", str(copy)]) == 0
    with opened_outside(copy) as (outside, inside):
        assert main(["conform", "--cases", str(copy)]) == 0
    assert outside == []
    listed = json.loads((copy / MANIFEST).read_text())["files"]
    assert {Path(p).resolve().relative_to(copy.resolve()).as_posix() for p in inside} >= set(listed)
    assert f"{len(case_ids(copy))} passed, 0 failed" in capsys.readouterr().out


# --- the manifest --------------------------------------------------------------------------------


def test_an_unlisted_dot_file_case_is_refused(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for suffix in (".json", ".safetensors"):
        shutil.copy(copy / f"orth/basic_f64{suffix}", copy / f"orth/.hidden{suffix}")
    with pytest.raises(CaseError, match=r"orth/\.hidden\.(json|safetensors): not listed in MANIFEST\.json"):
        read_manifest(copy)
    refuse(capsys, copy, ".hidden", "not listed")


def test_a_listed_dot_file_case_is_a_case_like_any_other(copy: Path) -> None:
    """write_manifest lists dot-files; case_ids does not skip them; this one claims another id."""
    for suffix in (".json", ".safetensors"):
        shutil.copy(copy / f"orth/basic_f64{suffix}", copy / f"orth/.hidden{suffix}")
    (copy / ".notes").write_text("a dot-file at the top")
    write_manifest(copy, PROVENANCE)
    listed = read_manifest(copy)["files"]
    assert {"orth/.hidden.json", "orth/.hidden.safetensors", ".notes"} <= set(listed)
    assert "orth/.hidden" in case_ids(copy)
    with pytest.raises(CaseError, match=r"\.hidden\.json: id: 'orth/basic_f64', but the file is orth/\.hidden\.json"):
        read_case(copy, "orth/.hidden")


@pytest.mark.parametrize("entry", ["../outside.txt", "orth/../../outside.txt", "/etc/hostname"])
def test_a_manifest_entry_outside_the_folder_is_refused_unopened(
    copy: Path, entry: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the entry was hashed (a file outside was read) and, its sha256 matching, accepted."""
    outside = copy.parent / "outside.txt"
    outside.write_text("not a case")
    target = Path(entry) if entry.startswith("/") else outside
    if not target.is_file():
        pytest.skip(f"{target} does not exist on this machine")
    edit_json(copy / MANIFEST, lambda m: m["files"].update({entry: sha256(target)}))
    with opened_outside(copy) as (opened, _):
        with pytest.raises(CaseError, match=r"MANIFEST\.json: files entry: .*(absolute path|'\.\.' component)"):
            read_manifest(copy)
        refuse(capsys, copy, repr(entry))
    assert opened == []


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("orth\\..\\..\\x", "backslash"),
        ("./orth/basic_f64.json", "'.' or '..' component"),
        ("orth//basic_f64.json", "empty, '.' or '..' component"),
        ("", "is not a relative path"),
        (MANIFEST, "does not list itself"),
    ],
)
def test_a_malformed_manifest_path_is_refused(copy: Path, entry: str, problem: str) -> None:
    edit_json(copy / MANIFEST, lambda m: m["files"].update({entry: "0" * 64}))
    with pytest.raises(CaseError, match="files entry") as err:
        read_manifest(copy)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(files=list(m["files"])), r"MANIFEST\.json: files: expected an object"),
        (lambda m: m.update(files=None), r"MANIFEST\.json: files: expected an object"),
        (lambda m: m.pop("files"), r"MANIFEST\.json: missing field 'files'"),
        (lambda m: m.update(provenance=[]), r"MANIFEST\.json: provenance: expected an object"),
        (lambda m: m.update(extra=1), r"MANIFEST\.json: unknown field 'extra'"),
        (lambda m: m["files"].update({"orth/basic_f64.json": "ABC"}), r"files\['orth/basic_f64\.json'\]: 'ABC' is not"),
        (lambda m: m["files"].update({"orth/basic_f64.json": 7}), r"files\['orth/basic_f64\.json'\]: 7 is not"),
    ],
)
def test_a_malformed_manifest_is_refused(
    copy: Path, change: Callable[[dict[str, Any]], object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `files` as a list or null was an AttributeError traceback; a bad digest read as a changed file."""
    edit_json(copy / MANIFEST, change)
    with pytest.raises(CaseError, match=message):
        read_manifest(copy)
    refuse(capsys, copy, "MANIFEST.json")


def test_a_symlinked_file_is_refused_even_with_the_right_sha256(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the link was followed (to a file outside the folder) and, its bytes matching, trusted."""
    outside = copy.parent / "elsewhere.safetensors"
    shutil.move(copy / "orth/basic_f64.safetensors", outside)
    (copy / "orth/basic_f64.safetensors").symlink_to(outside)
    with pytest.raises(CaseError, match=r"orth/basic_f64\.safetensors: a symbolic link"):
        read_manifest(copy)
    with pytest.raises(CaseError, match="symbolic link"):
        read_case(copy, "orth/basic_f64")
    refuse(capsys, copy, "symbolic link")


def test_a_symlinked_folder_is_refused(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = copy.parent / "elsewhere"
    shutil.move(copy / "orth", elsewhere)
    (copy / "orth").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CaseError, match=r"cases/orth: a symbolic link"):
        read_manifest(copy)
    with pytest.raises(CaseError, match="symbolic link"):
        read_case(copy, "orth/basic_f64")
    refuse(capsys, copy, "symbolic link")


def test_a_symlinked_manifest_is_refused_unread(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: MANIFEST.json was read through the link, from outside the folder, and trusted."""
    outside = copy.parent / "MANIFEST.json"
    shutil.move(copy / MANIFEST, outside)
    (copy / MANIFEST).symlink_to(outside)
    with opened_outside(copy) as (opened, _):
        with pytest.raises(CaseError, match=r"cases/MANIFEST\.json: a symbolic link"):
            read_manifest(copy)
        refuse(capsys, copy, "symbolic link")
    assert opened == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_not_read(copy: Path) -> None:
    """Reading a FIFO would wait forever for a writer: the walk and the readers refuse it unopened."""
    os.mkfifo(copy / "orth" / "pipe.json")
    with pytest.raises(CaseError, match=r"orth/pipe\.json: not a regular file"):
        read_manifest(copy)
    (copy / "orth" / "basic_f64.json").unlink()
    os.mkfifo(copy / "orth" / "basic_f64.json")
    with pytest.raises(CaseError, match=r"orth/basic_f64\.json: not a regular file"):
        read_case(copy, "orth/basic_f64")


@pytest.mark.parametrize("kind", ["a file", "a missing path"])
def test_cases_that_is_not_a_directory_is_refused(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: NotADirectoryError traceback (a file) from reading FILE/MANIFEST.json."""
    path = tmp_path / "cases"
    if kind == "a file":
        path.write_text("{}")
    for read in (read_manifest, case_ids):
        with pytest.raises(CaseError, match="is not a directory"):
            read(path)
    with pytest.raises(CaseError, match="is not a directory"):
        read_case(path, "orth/basic_f64")
    refuse(capsys, path, str(path), "is not a directory")


# --- the case JSON -------------------------------------------------------------------------------


def test_a_case_without_checks_is_refused_not_passed(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `"checks": []` ran zero checks and counted as a pass."""
    path = edit_case(copy, "orth/basic_f64", lambda c: c.update(checks=[], values={}))
    with pytest.raises(CaseError, match=r"basic_f64\.json: checks: empty"):
        read_case(copy, "orth/basic_f64")
    refuse(capsys, copy, str(path), "checks: empty")


def test_a_case_json_without_checks_names_the_field(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: KeyError 'checks' traceback."""
    edit_case(copy, "orth/basic_f64", lambda c: c.pop("checks"))
    with pytest.raises(CaseError, match=r"orth/basic_f64\.json: missing field 'checks'"):
        read_case(copy, "orth/basic_f64")
    refuse(capsys, copy, "basic_f64.json", "'checks'")


def test_a_case_file_outside_its_files_folder_is_refused_unopened(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `files` entries were joined to `<id>.files/` unchecked, and the checkpoint loaded from there."""
    elsewhere = copy.parent / "elsewhere"
    shutil.copytree(copy / "checkpoint/trained_and_saved.files", elsewhere)
    names = ["../../../elsewhere/adapter_config.json", "../../../elsewhere/adapter_model.safetensors"]
    edit_case(copy, "checkpoint/trained_and_saved", lambda c: c.update(files=names))
    with opened_outside(copy) as (opened, _):
        with pytest.raises(CaseError, match=r"trained_and_saved\.json: files\[0\]: .*'\.\.' component"):
            read_case(copy, "checkpoint/trained_and_saved")
        refuse(capsys, copy, "files[0]")
    assert opened == []


def put(field: str, value: object) -> Callable[[dict[str, Any]], object]:
    """Set `field` (dotted: `checks.0.rtol`) of a case JSON to `value`."""
    *parents, last = field.split(".")

    def change(case: dict[str, Any]) -> None:
        node: Any = case
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return change


ORTH = "orth/basic_f64"  # its checks are all tensors
LAYER = "layer/basic_64"  # inputs bias, grad_y, lora_A, ...; checks scaling (exact), ranknum (exact), y (tensor), ...
BAD_FIELDS = [
    (put("id", "layer/other"), "id: 'layer/other', but the file is layer/basic_64.json"),
    (put("kind", "orth"), "id: 'layer/basic_64' is not in its kind's folder orth/"),
    (put("kind", "bogus"), "kind: 'bogus' is not one of"),
    (put("kind", ["layer"]), "kind: ['layer'] is not one of"),
    (put("dtype", "float16"), "dtype: 'float16' is not one of float32, float64"),
    (put("description", 3), "description: expected a string, found int 3"),
    (put("config", []), "config: expected an object"),
    (put("provenance", None), "provenance: expected an object, found null"),
    (put("values", []), "values: expected an object"),
    (put("margins", {"step 1": float("nan")}), "margins['step 1']: expected a non-negative number"),
    (put("margins", {"step 1": "0.1"}), "margins['step 1']: expected a non-negative number"),
    (put("format", "adalora-ref-golden/2"), "format 'adalora-ref-golden/2', expected"),
    (put("surprise", 1), "unknown field 'surprise'"),
    (put("inputs", [1]), "inputs: expected an object"),
    (put("checks", {}), "checks: expected a list of checks"),
    (put("checks.0", "budget"), "checks[0]: expected an object"),
    (put("checks.0.type", "approx"), 'checks[0].type: \'approx\' is not "tensor" or "exact"'),
    (put("checks.0.key", ""), "checks[0].key: expected a non-empty string"),
    (put("checks.0.quantity", None), "checks[0].quantity: expected a non-empty string"),
    (put("checks.0.step", 1.5), "checks[0].step: expected a non-negative integer or null"),
    (put("checks.0.step", True), "checks[0].step: expected a non-negative integer or null"),
    (put("checks.0.step", -1), "checks[0].step: expected a non-negative integer or null"),
    (put("checks.0.layer", 3), "checks[0].layer: expected a string or null"),
    (put("checks.0.rtol", -1e-3), "checks[0].rtol: expected a non-negative finite number or null"),
    (put("checks.0.rtol", float("inf")), "checks[0].rtol: expected a non-negative finite number or null"),
    (put("checks.0.rtol", 10**400), "checks[0].rtol: expected a non-negative finite number or null"),
    (put("checks.0.rtol", "1e-3"), "checks[0].rtol: expected a non-negative finite number or null"),
    (put("checks.0.tolerance", 1), "checks[0]: unknown field 'tolerance'"),
    (lambda c: c["checks"][0].pop("type"), "checks[0]: missing field 'type'"),
    (lambda c: c["checks"].append(dict(c["checks"][1])), "checks[10].key: 'ranknum' is already the key of an earlier"),
    (lambda c: c["values"].clear(), "values: no entry for the exact check"),
    (lambda c: c["values"].update(stray=1), "values['stray']: no exact check has this key"),
    (put("values.scaling", [1.0, float("nan")]), "values['scaling']: holds NaN or infinity"),
    (put("values.ranknum", float("inf")), "values['ranknum']: holds NaN or infinity"),
    (put("files", "adapter_config.json"), "files: expected a list of file names"),
    (put("files", ["a/b"]), "files[0]: 'a/b' is not a plain file name"),
    (put("files", [".."]), "files[0]: '..' has an empty, '.' or '..' component"),
    (put("files", ["/etc/hostname"]), "files[0]: '/etc/hostname' is an absolute path"),
    (put("files", [None]), "files[0]: None is not a relative path"),
    (put("files", ["adapter_config.json"]), "files: 'adapter_config.json' is not a file in layer/basic_64.files/"),
]


@pytest.mark.parametrize(("change", "message"), BAD_FIELDS)
def test_every_field_of_a_case_is_checked(
    copy: Path, change: Callable[[dict[str, Any]], object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = json.loads((copy / f"{LAYER}.json").read_text())
    assert [c["type"] for c in meta["checks"][:3]] == ["exact", "exact", "tensor"] and len(meta["checks"]) == 10
    path = edit_case(copy, LAYER, change)
    with pytest.raises(CaseError) as err:
        read_case(copy, LAYER)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
    refuse(capsys, copy, str(path), message, kind="layer")


@pytest.mark.parametrize(
    ("field", "value"), [("inputs.lora_A.shape", [-1, 2]), ("inputs.lora_A.shape", [True]), ("inputs.lora_A.dtype", 1)]
)
def test_a_malformed_input_declaration_names_the_input(copy: Path, field: str, value: object) -> None:
    edit_case(copy, LAYER, put(field, value))
    with pytest.raises(CaseError, match=rf"basic_64\.json: inputs\['lora_A'\]\.{field.rsplit('.', 1)[1]}: "):
        read_case(copy, LAYER)


def edit_tensors(root: Path, case_id: str, change: Callable[[dict[str, np.ndarray]], object]) -> None:
    path = root / f"{case_id}.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    write_manifest(root, PROVENANCE)


def test_an_input_stored_in_another_dtype_than_declared_is_refused(copy: Path) -> None:
    edit_tensors(copy, LAYER, lambda t: t.update({"inputs/lora_A": t["inputs/lora_A"].astype(np.float32)}))
    with pytest.raises(
        CaseError, match=r"basic_64\.safetensors: inputs/lora_A has dtype float32, the case says float64"
    ):
        read_case(copy, LAYER)


def test_a_non_finite_expected_output_is_refused(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A NaN in an expected tensor would make its check unpassable (or, compared loosely, meaningless)."""
    key = next(c["key"] for c in json.loads((copy / f"{ORTH}.json").read_text())["checks"] if c["type"] == "tensor")

    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors[f"outputs/{key}"] = np.full_like(tensors[f"outputs/{key}"], np.nan)

    edit_tensors(copy, ORTH, poison)
    with pytest.raises(CaseError, match=rf"outputs/{key} holds NaN or infinity"):
        read_case(copy, ORTH)
    refuse(capsys, copy, f"outputs/{key}")


@pytest.mark.parametrize("case_id", ["../cases/orth/basic_f64", "/etc/hostname", "orth\\basic_f64"])
def test_read_case_refuses_an_id_that_leaves_the_folder(copy: Path, case_id: str) -> None:
    with pytest.raises(CaseError, match="case id"):
        read_case(copy, case_id)


def test_the_bundled_cases_meet_every_rule() -> None:
    """The rules refuse nothing peft produced: every bundled case loads and none has a dot-name or link."""
    manifest = read_manifest(CASES)
    assert len(case_ids(CASES)) >= 59 and all(read_case(CASES, i).checks for i in case_ids(CASES))
    assert not any(part.startswith(".") for rel in manifest["files"] for part in rel.split("/"))
