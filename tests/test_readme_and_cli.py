"""The README's example runs as written, and the `adalora-ref train` command works."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from adalora_ref.cli import main

README = Path(__file__).parents[1] / "README.md"


def test_readme_example_runs_and_prints_a_rank_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    pattern = namespace["config"].rank_pattern
    assert set(pattern) == {"fc1.lora_E", "fc2.lora_E"}
    assert all(len(keep) == 6 for keep in pattern.values())
    assert sum(sum(keep) for keep in pattern.values()) <= 2 * 2  # target budget: target_r * layers
    assert "fc1.lora_E" in capsys.readouterr().out


def test_readme_quick_start_commands_are_the_ci_commands() -> None:
    text = README.read_text()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert 'pip install ".[test,golden]" && python -m pytest' in text
    assert "python -m pytest\n" in ci and '".[test,golden]"' in ci
    assert "pip install . && adalora-ref conform" in text


def test_cli_train_prints_budget_and_rank_pattern(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--steps", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "budget" in out and "final rank pattern" in out
    ranks = [int(m) for m in re.findall(r"rank (\d+)\n", out)]
    assert len(ranks) == 3 and sum(ranks) <= 9


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--steps", "3"])
    assert "adalora-ref train: error: argument --steps: must be an integer >= 10, got '3'" in capsys.readouterr().err


def test_output_into_a_closed_pipe_is_no_traceback() -> None:
    """`adalora-ref cases list | head -1`: the reader leaves early; the command ends quietly."""
    import subprocess
    import sys

    code = "import sys; from adalora_ref.cli import main; sys.exit(main(['cases', 'list']))"
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 1
