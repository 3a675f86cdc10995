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


def _driver_module():
    """ports/peft/driver.py imported as a module (it puts ports/peft and golden/ on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("peft_port_driver", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_case_whose_process_dies_or_hangs_costs_that_case_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SPEC 16.2's rule for a framework that can end the process: one forked case is killed by a
    signal (as a segfault or the OOM killer would), one hangs past the timeout; both are reported,
    and the case between them still writes its outputs, which pass."""
    import os
    import signal
    import time

    from adalora_ref.conformance.case import read_case
    from adalora_ref.conformance.port import write_port_outputs

    driver = _driver_module()
    killed, hung, good = "schedule/tinit_zero", "schedule/tiny_total_step", "orth/basic_f64"

    def drive_one(cases: Path, out: Path, case_id: str) -> None:
        if case_id == killed:
            os.kill(os.getpid(), signal.SIGKILL)
        if case_id == hung:
            time.sleep(60)
        case = read_case(cases, case_id)
        write_port_outputs(out, case, case.expected)  # the golden values: a port that is right

    monkeypatch.setattr(driver, "drive_one", drive_one)  # the forked children inherit it
    out = tmp_path / "out"
    results = {case_id: why for case_id, why, _ in driver.forked(CASES, out, [killed, good, hung], 2, 3.0)}
    assert results[good] is None
    assert results[killed] == f"exit {-signal.SIGKILL}: the process died"
    assert results[hung] == "timed out after 3 s"
    judged = {r.case_id: r for r in run_cases(CASES, port=out) if r.case_id in (killed, good, hung)}
    assert judged[good].status == "pass"
    assert all(judged[i].error is not None and judged[i].error.startswith("no outputs") for i in (killed, hung))
