"""The control of the known-implementations matrix (ports/, docs/PORTS.md): the peft driver on the
installed peft 0.21.2, the release the golden cases come from, passes every case with nothing
declared unsupported; and a case whose process fails costs that case only, reported as such."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adalora_ref.conformance.case import bundled_cases_dir, case_ids
from adalora_ref.conformance.runner import run_cases

peft = pytest.importorskip("peft", reason="the golden extra (torch, peft 0.21.2) is not installed")
pytestmark = pytest.mark.peft

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "ports" / "peft" / "driver.py"
CASES = bundled_cases_dir()


def drive(out: Path, *args: str, cases: Path = CASES) -> subprocess.CompletedProcess:
    command = [sys.executable, str(DRIVER), "--cases", str(cases), "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.skipif(peft.__version__ != "0.21.2", reason="the control is peft 0.21.2, the golden cases' release")
def test_driver_on_peft_0_21_2_passes_every_case(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = drive(out)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "port.json").read_text()) == {"unsupported": {}}
    log = json.loads((out / "driver_log.json").read_text())
    assert log["failed"] == {}
    results = list(run_cases(CASES, port=out))
    assert len(results) == len(case_ids(CASES))
    failing = {r.case_id: r.error or r.first_failure for r in results if r.status != "pass"}
    assert failing == {}


def test_a_case_whose_process_fails_costs_that_case_only(tmp_path: Path) -> None:
    """A copy of two cases, one of them changed so that its driver process raises (an unknown kind in
    its config): one process per case, so the other case still writes its outputs and passes, and the
    broken one is reported without outputs, in the driver's log and by conform."""

    from adalora_ref.conformance.case import read_case, write_case, write_manifest

    cases = tmp_path / "cases"
    good, broken = "schedule/tiny_total_step", "schedule/tinit_zero"
    for case_id in (good, broken):
        case = read_case(CASES, case_id)
        if case_id == broken:
            case.config = {**case.config, "steps": "not a list of steps"}
        write_case(cases, case)
    write_manifest(cases, {"generator": "tests/test_ports_control.py"})
    out = tmp_path / "out"
    done = drive(out, cases=cases)
    assert done.returncode == 0, done.stderr
    assert f"driver: {broken}: no outputs (exit 1: " in done.stderr
    log = json.loads((out / "driver_log.json").read_text())
    assert set(log["failed"]) == {broken}
    assert log["failed"][broken].startswith("exit 1: ")
    results = {r.case_id: r for r in run_cases(cases, port=out)}
    assert results[good].status == "pass"
    assert results[broken].status == "fail"
    assert results[broken].error is not None and results[broken].error.startswith("no outputs for this case")


def test_driver_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    done = drive(out, "--only", "schedule/tiny_total_step")
    assert done.returncode != 0
    assert "not empty and not written by this driver" in done.stderr
    assert (out / "notes.txt").read_text() == "mine"
