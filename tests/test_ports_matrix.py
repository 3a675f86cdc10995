"""docs/PORTS.md as ports/matrix.py writes it from conform reports: cells, grouping of rows that
behave alike, unsupported reasons, and each divergence with its traced cause line (found in the
release's own site-packages) or marked untraced."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ports"))

import causes
import matrix


def result(case: str, status: str, first: str | None = None, unsupported: str | None = None) -> dict:
    return {
        "case": case,
        "kind": case.split("/")[0],
        "status": status,
        "first_failure": first,
        "unsupported": unsupported,
    }


def report(path: Path, results: list[dict]) -> Path:
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "unsupported")}
    path.write_text(json.dumps({"counts": counts, "results": results}))
    return path


@pytest.fixture
def release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake release's site-packages, holding the causing line at line 3."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "peft"
    site.mkdir(parents=True)
    (site / "model.py").write_text("a = 1\nb = 2\nif orth_reg_weight <= 0:\n    raise ValueError\n")
    cause = causes.Cause(
        "orth",
        "orth_reg_weight = 0 raises",
        ("peft 0.1.0",),
        ("trajectory/*",),
        r"greater than 0",
        "peft/model.py",
        "if orth_reg_weight <= 0:",
        "if orth_reg_weight <= 0: raise",
        "the forward refuses it.",
    )
    monkeypatch.setattr(causes, "CAUSES", [cause])
    return site.parent


def test_cells_grouping_reasons_and_traced_causes(tmp_path: Path, release: Path) -> None:
    shared = [
        result("layer/a", "pass"),
        result("layer/b", "unsupported", unsupported="no conv"),
        result("trajectory/t", "fail", "no outputs for this case: expected ..."),
        result("config/c", "fail", "accepted of entry 5 is true, expected false"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    (out / "driver_log.json").write_text(
        json.dumps({"failed": {"trajectory/t": "exit 1: ValueError: should be greater than 0"}})
    )
    rows = [
        matrix.Row("peft 0.1.0", report(tmp_path / "a.json", shared), release, out),
        matrix.Row("peft 0.2.0", report(tmp_path / "b.json", shared), release, out),
        matrix.Row("reference", report(tmp_path / "r.json", [result("layer/a", "pass")]), None),
        matrix.Row("loralib (authors)", tmp_path / "missing.json", None),
    ]
    path = tmp_path / "PORTS.md"
    matrix.write_matrix(path, rows, "python ports/build.py", loralib_given=False)
    text = path.read_text()
    assert "Rebuilt by `python ports/build.py`" in text
    assert "| peft 0.1.0, peft 0.2.0 | 1 / 1 (1 unsup.) |" in text  # grouped; layer: 1 of 1, 1 unsupported
    assert "- loralib (authors): not built: run with --loralib PATH" in text
    assert "no conv (1: layer/b)" in text
    assert "`peft/model.py:3 (peft 0.1.0)`, `peft/model.py:3 (peft 0.2.0)`: `if orth_reg_weight <= 0: raise`" in text
    assert "no outputs: the release raised ValueError: should be greater than 0" in text
    assert "- **untraced**: `config/c`" in text


def test_a_cause_pattern_missing_from_the_release_is_marked_untraced(tmp_path: Path, release: Path) -> None:
    (release / "peft" / "model.py").write_text("changed\n")
    failing = [result("trajectory/t", "fail", "orth_reg_weight should be greater than 0")]
    rows = [matrix.Row("peft 0.1.0", report(tmp_path / "a.json", failing), release)]
    path = tmp_path / "PORTS.md"
    matrix.write_matrix(path, rows, "python ports/build.py", loralib_given=True)
    assert "peft/model.py (pattern not found: untraced)" in path.read_text()
