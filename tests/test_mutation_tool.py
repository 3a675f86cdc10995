"""The mutation tool (mutation/, python -m mutation) without running a mutation: the committed report
classifies every survivor and its gate holds killed mutants; survivors.toml is read strictly; the
scores and the report add up; mutant ids stay put when unrelated lines move."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mutation import report, session
from mutation.__main__ import main
from mutation.session import Mutant


def test_every_committed_survivor_is_classified() -> None:
    _, mutants = report.read_results()
    classes = report.read_classes()
    survivors = [m for m in mutants if m.outcome == "survived"]
    assert survivors and [m.id for m in survivors if m.id not in classes] == []
    assert report.stale_classes(mutants, classes) == []


def test_the_gate_holds_only_mutants_conform_kills() -> None:
    _, mutants = report.read_results()
    outcome = {m.id: m.outcome for m in mutants}
    ids = {line.split("#")[0].strip() for line in report.GATE.read_text().splitlines()} - {""}
    assert len(ids) >= 20 and {outcome.get(i) for i in ids} == {"killed"}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[survivor]]\nid = "a"\nclass = "harmless"\nwhy = "x"\n', "survivor[0]: class must be one of"),
        ('[[survivor]]\nid = "a"\nclass = "equivalent"\n', "survivor[0]: 'why' must be a non-empty string"),
        (
            '[[survivor]]\nid = "a"\nclass = "equivalent"\nwhy = "x"\n' * 2,
            "survivor[1]: id a is classified twice",
        ),
        ("[[survivor]\n", "survivors.toml: "),
    ],
)
def test_survivors_toml_is_read_strictly(toml: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "survivors.toml"
    path.write_text(toml)
    with pytest.raises(report.ClassificationError, match=message.replace("[", r"\[")):
        report.read_classes(path)


def mutant(id: str, outcome: str, module: str = "adalora_ref/orth.py") -> Mutant:
    return Mutant(id, module, 3, 4, "f", "NumberReplacer", 0, "x = 0", "x = 1", outcome)


def test_scores_and_report_add_up() -> None:
    mutants = [
        mutant("k1", "killed"),
        mutant("t1", "timeout"),
        mutant("s1", "survived"),
        mutant("s2", "survived"),
        mutant("i1", "incompetent"),
        mutant("k2", "killed", "adalora_ref/layer.py"),
    ]
    table = report.scores(mutants)
    assert table["adalora_ref/orth.py"] == {"killed": 1, "timeout": 1, "survived": 2, "incompetent": 1, "run": 4}
    assert table["all"]["run"] == 5 and list(table)[-1] == "all"
    run = {"rev": "abc", "cosmic_ray": "8.7.0", "modules": ["orth", "layer"], "what": "all of them"}
    run.update({"of_operators": 6, "total": 30, "cases": 80, "conform_seconds": 1.0, "wall_minutes": 0.1})
    text = report.render(run, mutants, {"s1": {"id": "s1", "class": "equivalent", "why": "a default"}})
    # orth: 2 of 4 killed (50%); without the equivalent survivor 2 of 3
    assert "| `adalora_ref/orth.py` | 4 | 2 | 2 | 1 | 0 | 1 | 50.0% | 66.7% |" in text
    assert "1. equivalent: a default" in text
    assert "| `s1` | `adalora_ref/orth.py:3` | `f` | `x = 0` → `x = 1` | equivalent (1) |" in text
    assert "| `s2` | `adalora_ref/orth.py:3` | `f` | `x = 0` → `x = 1` | **unclassified** |" in text


def item(job: str, line: int, occurrence: int = 0) -> SimpleNamespace:
    spec = SimpleNamespace(
        module_path="m.py",
        operator_name="core/NumberReplacer",
        occurrence=occurrence,
        start_pos=(line, 4),
        definition_name="f",
    )
    return SimpleNamespace(job_id=job, mutations=[spec])


def test_mutant_ids_are_distinct_and_survive_moved_lines(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("def f():\n    x = 0\n")
    ids = session.mutant_ids([item("a", 2, 0), item("b", 2, 1)], tmp_path)  # n + 1 and n - 1 of one number
    assert len(set(ids.values())) == 2
    (tmp_path / "m.py").write_text("import os\n\ndef f():\n    x = 0\n")  # an unrelated edit above
    assert session.mutant_ids([item("c", 4, 0), item("d", 4, 1)], tmp_path) == {"c": ids["a"], "d": ids["b"]}


def test_run_refuses_a_bad_sample_before_doing_anything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--sample", "0"]) == 2
    assert "--sample must be at least 1, got 0" in capsys.readouterr().err


def test_every_operator_is_one_of_cosmic_rays() -> None:
    plugins = pytest.importorskip("cosmic_ray.plugins", reason="cosmic-ray is the optional 'mutation' extra")
    assert set(session.OPERATORS) <= set(plugins.operator_names())
