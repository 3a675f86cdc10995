"""The golden cases are reproducible from peft: `golden/generate.py --check` regenerates them into
a temporary directory with torch and peft and compares with the committed files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adalora_ref.conformance.case import write_manifest

from .peft_live import require_peft

ROOT = Path(__file__).parents[1]
CASES = ROOT / "golden" / "cases"


def run_check(cases: Path) -> subprocess.CompletedProcess:
    require_peft()
    return subprocess.run(
        [sys.executable, "golden/generate.py", "--check", "--out", str(cases)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.peft
def test_generator_check_passes() -> None:
    result = run_check(CASES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 differ from a fresh generation" in result.stdout


@pytest.mark.peft
def test_generator_check_catches_an_edited_case(tmp_path: Path) -> None:
    """An expected value edited by hand (with the manifest updated to hide it) is caught."""
    cases = Path(shutil.copytree(CASES, tmp_path / "cases"))
    path = cases / "schedule" / "tinit_zero.json"
    meta = json.loads(path.read_text())
    meta["values"]["step10.budget"] += 1
    path.write_text(json.dumps(meta))
    write_manifest(cases, json.loads((CASES / "MANIFEST.json").read_text())["provenance"])
    result = run_check(cases)
    assert result.returncode == 1
    assert "schedule/tinit_zero: budget at step 10 is" in result.stdout
