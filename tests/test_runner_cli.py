"""`adalora-ref conform` as a port's author and its CI use it: port.json's unsupported cases,
JSON tensors (zero-size ones too), case selection and its refusals, JUnit XML, reports that cannot
be written, and `adalora-ref cases export`. Each port here is the reference dumped in the port
format (`dump_port`), changed where a test needs a mistake."""

from __future__ import annotations

import errno
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adalora_ref import _files
from adalora_ref.cli import main
from adalora_ref.conformance.case import KINDS, MANIFEST, CaseError, read_case
from adalora_ref.conformance.port import json_tensor
from adalora_ref.conformance.report import diagnosis_text
from adalora_ref.conformance.runner import run_cases
from tests.test_conformance import ALL_IDS, CASES, dump_port

ORTH = [i for i in ALL_IDS if i.startswith("orth/")]


def conform(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["conform", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run a command that argparse refuses; returns stderr (usage, then one error line)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def row(out: str, case_id: str) -> list[str]:
    """The table row of `case_id` and the lines under it, up to the next case's row."""
    lines = out.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith(case_id + " "))
    end = next((n for n in range(start + 1, len(lines)) if not lines[n].startswith(" ")), len(lines))
    return lines[start:end]


# --- port.json: what a port does not do ------------------------------------------------------------


def test_declared_unsupported_cases_are_reported_with_their_reason_and_do_not_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for case_id in ORTH:
        if not case_id.endswith("_f32"):
            dump_port(tmp_path, case_id)
    dump_port(tmp_path, "layer/basic_64")  # declared too: port.json wins over outputs that are there
    reason = "our tensor library has no float32 matmul"
    write_json(tmp_path / "port.json", {"unsupported": {"orth/*_f32": reason, "layer/basic_64": "not yet"}})
    report = tmp_path / "report.json"
    code, out, _ = conform(
        capsys, "--port", str(tmp_path), "--case", "layer/basic_64", "--case", "orth/*", "--json", str(report)
    )
    assert code == 0
    lines = row(out, "orth/basic_f32")
    assert lines[0].rstrip().endswith("unsupported") and lines[1].strip() == f"unsupported: {reason}"
    assert row(out, "layer/basic_64")[1].strip() == "unsupported: not yet"
    assert out.strip().endswith(f"{len(ORTH) - 1} passed, 0 failed, 2 unsupported")
    data = json.loads(report.read_text())
    assert data["passed"] is True
    assert data["counts"] == {"pass": len(ORTH) - 1, "fail": 0, "unsupported": 2}
    by_id = {r["case"]: r for r in data["results"]}
    assert by_id["orth/basic_f32"]["status"] == "unsupported" and by_id["orth/basic_f32"]["unsupported"] == reason
    assert by_id["orth/basic_f64"]["status"] == "pass" and by_id["orth/basic_f64"]["unsupported"] is None


def test_a_glob_in_port_json_that_matches_no_case_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump_port(tmp_path, "orth/basic_f64")
    write_json(tmp_path / "port.json", {"unsupported": {"conv_layers/*": "no conv", "conv_layer/*": "no conv"}})
    code, _, err = conform(capsys, "--port", str(tmp_path), "--case", "orth/basic_f64")
    assert code == 0
    assert "port.json: 'conv_layers/*' matches no case" in err
    assert "'conv_layer/*'" not in err  # it matches cases, just none selected in this run


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("[1, 2]", 'expected an object {"unsupported"'),
        ('{"unsuported": {}}', "unknown key 'unsuported'"),
        ('{"unsupported": ["conv_layer/*"]}', '"unsupported" must be an object'),
        ('{"unsupported": {"conv_layer/*": 3}}', "unsupported['conv_layer/*'] must be a non-empty reason string"),
        ('{"unsupported": {"conv_layer/*": ""}}', "unsupported['conv_layer/*'] must be a non-empty reason string"),
        ('{"unsupported": {"": "why"}}', "empty case id glob"),
        ('{"unsupported": {', "invalid JSON"),
    ],
)
def test_a_malformed_port_json_is_refused_naming_the_file_and_field(
    content: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "port.json").write_text(content)
    code, out, err = conform(capsys, "--port", str(tmp_path), "--kind", "orth")
    assert code == 2 and out == ""
    assert err.startswith(f"adalora-ref conform: {tmp_path / 'port.json'}: ") and named in err
    assert len(err.strip().splitlines()) == 1


def test_a_case_without_outputs_says_so_and_points_to_port_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = conform(capsys, "--port", str(tmp_path), "--case", "orth/basic_f64")
    assert code == 1
    detail = " ".join(row(out, "orth/basic_f64"))
    assert "no outputs for this case" in detail and f"declare it in {tmp_path / 'port.json'}" in detail


# --- tensors in the port's JSON file ---------------------------------------------------------------


def as_json_tensors(port: Path, case_id: str, *, nested: bool) -> None:
    """Move every tensor of a dumped port into its JSON file, in the {"shape", "data"} form."""
    st_path, json_path = (port / case_id).with_suffix(".safetensors"), (port / case_id).with_suffix(".json")
    values = json.loads(json_path.read_text())["values"]
    tensors = load_file(str(st_path))
    for check in read_case(CASES, case_id).checks:
        if check.type == "tensor":
            array = tensors[check.key]
            data = array.tolist() if nested else array.reshape(-1).tolist()
            values[check.key] = {"shape": list(array.shape), "data": data}
    st_path.unlink()
    write_json(json_path, {"values": values})


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_zero_size_tensors_in_json_pass(nested: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case_id in ("orth/r_zero_f64", "layer/r_zero_64"):
        dump_port(tmp_path, case_id)
        as_json_tensors(tmp_path, case_id, nested=nested)
    assert json.loads((tmp_path / "orth/r_zero_f64.json").read_text())["values"]["grad.q.lora_A"] == {
        "shape": [0, 8],
        "data": [],
    }
    code, out, _ = conform(capsys, "--port", str(tmp_path), "--case", "*/r_zero_64", "--case", "*/r_zero_f64")
    assert code == 0, out
    assert out.strip().endswith("2 passed, 0 failed")


def test_a_json_tensor_whose_data_does_not_match_its_shape_fails_the_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump_port(tmp_path, "orth/r_zero_f64")
    path = tmp_path / "orth/r_zero_f64.json"
    values = json.loads(path.read_text())["values"]
    values["grad.q.lora_A"] = {"shape": [0, 8], "data": [1.0]}
    write_json(path, {"values": values})
    code, out, _ = conform(capsys, "--port", str(tmp_path), "--case", "orth/r_zero_f64")
    assert code == 1
    assert "values['grad.q.lora_A']: data has shape [1] (1 numbers), shape says [0, 8]" in " ".join(
        row(out, "orth/r_zero_f64")
    )


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"shape": [2, 3], "data": [1, 2, 3, 4, 5]}, "data has shape [5] (5 numbers), shape says [2, 3]"),
        ({"shape": [3, 2], "data": [[1, 2, 3], [4, 5, 6]]}, "data has shape [2, 3] (6 numbers), shape says [3, 2]"),
        ({"shape": [2], "data": [1, 2], "dtype": "f32"}, 'exactly the keys "shape" and "data"'),
        ({"shape": "2x3", "data": []}, "shape must be a list of integers"),
        ({"shape": [-1, 0], "data": []}, "negative size"),
        ({"shape": [2], "data": [1, None]}, "expected numbers, found null"),
        ([[1, 2], [3]], "nested lists of unequal lengths"),
        ([True, False], "expected numbers, found true"),
        ("0.5", 'expected numbers, found "0.5"'),
    ],
)
def test_json_tensor_refuses_what_is_not_a_tensor(value: object, named: str) -> None:
    with pytest.raises(CaseError, match=r"^x\.json: values\['y'\]") as info:
        json_tensor(value, "x.json: values['y']")
    assert named in str(info.value)


def test_json_tensor_forms() -> None:
    assert json_tensor(0.5, "w").shape == ()
    assert json_tensor([[1, 2, 3], [4, 5, 6]], "w").shape == (2, 3)
    np.testing.assert_array_equal(json_tensor({"shape": [2, 2], "data": [1, 2, 3, 4]}, "w"), [[1, 2], [3, 4]])
    assert json_tensor({"shape": [5, 0], "data": []}, "w").shape == (5, 0)
    assert json_tensor({"shape": [], "data": 2.5}, "w") == 2.5


# --- selecting cases -------------------------------------------------------------------------------


def test_case_globs_select_and_combine_with_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    assert [r.case_id for r in run_cases(CASES, globs=["orth/*_f64", "layer/basic_64"])] == [
        "layer/basic_64",
        "orth/basic_f64",
        "orth/r_zero_f64",
        "orth/zero_norm_f64",
    ]
    assert [r.case_id for r in run_cases(CASES, kinds=["orth", "layer"], globs=["*_f32", "*basic_32"])] == [
        "layer/basic_32",
        "orth/basic_f32",
    ]
    code, out, _ = conform(capsys, "--case", "schedule/tinit_zero")
    assert code == 0 and out.strip().endswith("1 passed, 0 failed")


def test_an_unknown_kind_is_refused_naming_the_valid_kinds(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = conform(capsys, "--kind", "layer", "--kind", "bogus")
    assert code == 2 and out == ""
    assert err == f"adalora-ref conform: --kind 'bogus': unknown kind; the kinds are {', '.join(KINDS)}\n"


def test_a_glob_matching_no_case_is_refused_with_example_ids(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = conform(capsys, "--case", "orth/*", "--case", "layers/*")
    assert code == 2 and out == ""
    assert "--case 'layers/*' matches no case" in err and "layer/alpha_half_32" in err  # the first layer id
    code, out, err = conform(capsys, "--kind", "layer", "--case", "orth/*")
    assert code == 2 and "matches --kind layer and --case orth/*" in err


# --- JUnit XML ----------------------------------------------------------------------------------


def test_junit_report_has_a_testcase_per_case_with_failures_errors_and_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = tmp_path / "port"
    for case_id in ("orth/basic_f64", "orth/r_zero_f64"):
        dump_port(port, case_id)
    path = port / "orth/r_zero_f64.json"  # a wrong value: the JSON file wins over the safetensors one
    values = json.loads(path.read_text())["values"]
    write_json(path, {"values": {**values, "value": 0.25}})
    write_json(port / "port.json", {"unsupported": {"orth/*_f32": 'no float32 <yet> & \x01 "soon"'}})
    xml_path = tmp_path / "ci" / "junit.xml"  # its folder does not exist yet
    assert main(["conform", "--port", str(port), "--kind", "orth", "--kind", "layer", "--junit", str(xml_path)]) == 1

    root = ET.parse(xml_path).getroot()
    n_layer = sum(i.startswith("layer/") for i in ALL_IDS)
    assert root.tag == "testsuites"
    assert {k: root.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": str(len(ORTH) + n_layer),
        "failures": "1",
        "errors": str(n_layer + 1),  # no layer outputs at all, and orth/zero_norm_f64 missing
        "skipped": "1",
    }
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["layer", "orth"]
    orth = suites["orth"]
    assert {k: orth.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": str(len(ORTH)),
        "failures": "1",
        "errors": "1",
        "skipped": "1",
    }
    assert {p.get("name"): p.get("value") for p in orth.iter("property")}["subject"] == str(port)
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == set(ORTH) | {i for i in ALL_IDS if i.startswith("layer/")}
    assert all(c.get("classname") == name.split("/")[0] and float(c.get("time")) >= 0 for name, c in cases.items())
    assert list(cases["orth/basic_f64"]) == []

    failing = next(r for r in run_cases(CASES, port=port, globs=["orth/r_zero_f64"]))
    failure = cases["orth/r_zero_f64"].find("failure")
    assert failure is not None and failure.get("message") == failing.first_failure
    assert failure.text == diagnosis_text(failing) and "value" in failure.text
    error = cases["orth/zero_norm_f64"].find("error")
    assert error is not None and "no outputs for this case" in error.get("message")
    skipped = cases["orth/basic_f32"].find("skipped")
    assert skipped is not None and skipped.get("message") == 'no float32 <yet> & \\x01 "soon"'


# --- reports that cannot be written -----------------------------------------------------------------


@pytest.mark.parametrize("option", ["--json", "--junit"])
def test_an_unwritable_report_path_is_refused_before_any_case_runs(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for target, named in [
        (a_file / "report", f"{a_file} is not a directory"),
        (tmp_path, "it is a directory"),
        (Path("/proc/adalora-ref-report"), "cannot create files in /proc"),
    ]:
        err = refused(capsys, "conform", option, str(target))
        assert err.splitlines()[-1].startswith(f"adalora-ref conform: error: argument {option}: cannot write")
        assert named in err.splitlines()[-1]
    assert os.listdir(tmp_path) == ["a_file"]


def test_a_full_disk_when_the_report_is_written_is_one_line_and_leaves_the_old_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.json"
    report.write_text("the previous report\n")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_files.os, "fsync", no_space)
    with pytest.raises(SystemExit) as exit_info:
        main(["conform", "--kind", "orth", "--json", str(report)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out.strip().endswith(f"{len(ORTH)} passed, 0 failed")  # the table came first
    expected = f"adalora-ref conform: error: --json: cannot write {report}: [Errno 28] No space left on device\n"
    assert captured.err == expected
    assert report.read_text() == "the previous report\n" and os.listdir(tmp_path) == ["report.json"]


# --- adalora-ref cases -----------------------------------------------------------------------------


def test_cases_export_writes_a_verified_copy_that_conform_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "suite" / "cases"
    assert main(["cases", "export", str(dest)]) == 0
    assert f"{len(ALL_IDS)} cases and {MANIFEST} written to {dest}" in capsys.readouterr().out
    assert (dest / MANIFEST).read_bytes() == (CASES / MANIFEST).read_bytes()
    assert os.listdir(tmp_path / "suite") == ["cases"]  # no staging folder left beside it
    code, out, _ = conform(capsys, "--cases", str(dest))
    assert code == 0 and out.strip().endswith(f"{len(ALL_IDS)} passed, 0 failed")
    assert main(["cases", "export", str(dest)]) == 0  # the same cases again: nothing to do
    assert "already holds these cases, unchanged" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cases", "export", str(empty), "--cases", str(dest)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == sorted(p.name for p in dest.iterdir())
    assert main(["cases", "list", "--cases", str(empty)]) == 0
    listing = capsys.readouterr().out.splitlines()[-len(ALL_IDS) :]
    assert [line.split()[0] for line in listing] == ALL_IDS


def test_cases_export_never_touches_a_folder_that_holds_something_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    assert main(["cases", "export", str(mine)]) == 2
    assert f"{mine}: not empty" in capsys.readouterr().err
    assert [p.relative_to(mine).as_posix() for p in sorted(mine.rglob("*"))] == ["notes", "notes/todo.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["cases", "export", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "mine"]


def test_cases_export_refuses_a_tampered_source_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    assert main(["cases", "export", str(source)]) == 0
    path = source / "orth" / "basic_f64.json"
    path.write_text(path.read_text().replace('"float64"', '"float32"', 1))
    capsys.readouterr()
    assert main(["cases", "export", str(tmp_path / "copy"), "--cases", str(source)]) == 2
    assert "orth/basic_f64.json: changed or truncated" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_cases_export_that_fails_midway_leaves_no_folder_and_no_staging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adalora_ref.conformance import export

    calls = []

    def full_disk_at_the_20th_file(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        _files.write_atomically(path, data)

    monkeypatch.setattr(export, "write_atomically", full_disk_at_the_20th_file)
    assert main(["cases", "export", str(tmp_path / "cases")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(": No space left on device\n")
    assert os.listdir(tmp_path) == []


def test_cases_export_into_an_empty_folder_moves_the_manifest_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash while filling an existing empty folder leaves it without a manifest: conform refuses it."""
    from adalora_ref.conformance import export

    dest = tmp_path / "cases"
    dest.mkdir()
    real_rename, moved = os.rename, []

    def fail_on_the_third(src: Path, dst: Path) -> None:
        moved.append(Path(dst).name)
        if len(moved) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", fail_on_the_third)
    assert main(["cases", "export", str(dest)]) == 2
    monkeypatch.undo()
    assert MANIFEST not in os.listdir(dest) and len(os.listdir(dest)) == 2
    assert os.listdir(tmp_path) == ["cases"]  # the staging folder is gone
    capsys.readouterr()
    code, _, err = conform(capsys, "--cases", str(dest))
    assert code == 2 and "MANIFEST.json" in err


def test_an_unavailable_backend_is_one_line_before_any_case(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As train, demo and bench: the option named, how to install it, exit 2, and no case run."""
    import sys

    from adalora_ref.conformance import runner

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(runner, "run_case", lambda *a: pytest.fail("a case ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["conform", "--backend", "torch"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("adalora-ref conform: error: --backend torch cannot run here:") and "pip install" in err
