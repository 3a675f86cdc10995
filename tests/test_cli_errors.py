"""Every error of `adalora-ref train | demo | bench`: one line naming the problem, exit 2, before the long work.

What is checked, command by command: bad values of every checked option (a negative seed, too few
steps, NaN weights, ...) are refused by argparse with the option and the value; an array library
that is not installed is refused before training (torch hidden through sys.modules, as if it were
not installed); an output path that cannot be written (`bench --json`, `demo --plot`) is refused
before any benchmark or training runs, and leaves nothing behind; a disk that fills up while the
report or a figure is written at the end gives one line naming the file and the OS error, no
traceback and no half-written file; every option's help states its default. The training, demo and
benchmark functions are replaced by ones that fail the test, so none of these tests does the long work.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from adalora_ref import bench, bench_report, cli, demo
from adalora_ref._files import TEMP_MARK
from adalora_ref.cli import main
from adalora_ref.cli_args import (
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_int,
    usable_directory,
    writable_file,
)

COMMANDS = ("train", "demo", "bench")


@pytest.fixture
def no_long_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training, the demo's runs and the benchmarks fail the test if they are ever reached."""

    def reached(*args: object, **kwargs: object) -> None:
        pytest.fail("the long work started although the command line was bad")

    monkeypatch.setattr(cli, "run_train", reached)
    monkeypatch.setattr(demo, "run_demo", reached)
    monkeypatch.setattr(bench_report, "run_benchmarks", reached)


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up during a write: os.write writes part of the bytes, then fails with ENOSPC
    (and os.fsync fails alike, for writers that buffer)."""
    real_write = os.write
    started: set[int] = set()

    def write(fd: int, data: bytes) -> int:
        if fd in started:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        started.add(fd)
        return real_write(fd, bytes(data)[: max(1, len(data) // 2)])

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command; assert exit 2, no traceback and exactly one error line (after argparse's usage); return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert errors == [lines[-1]], err
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), err  # the rest is the usage
    assert errors[0].startswith(f"adalora-ref {argv[0]}: error: "), err
    return errors[0]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# -- option values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["train", "--seed", "1.5"], "argument --seed: must be an integer >= 0, got '1.5'"),
        (["train", "--steps", "0"], "argument --steps: must be an integer >= 10, got '0'"),
        (["train", "--steps", "3"], "argument --steps: must be an integer >= 10, got '3'"),
        (["train", "--steps", "ten"], "argument --steps: must be an integer >= 10, got 'ten'"),
        (["train", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
        (["demo", "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["demo", "--steps", "0"], "--steps must be at least 100 (warm-up, budgeting and final phase), got 0"),
        (["demo", "--init-r", "-3"], "--init-r must be between 1 and the layer width 32, got -3"),
        (["demo", "--planted", "1,x"], "argument --planted: expected comma-separated integer ranks"),
        (["demo", "--orth-reg-weight", "nan"], "argument --orth-reg-weight: must be a finite number >= 0, got 'nan'"),
        (["demo", "--orth-reg-weight", "inf"], "argument --orth-reg-weight: must be a finite number >= 0, got 'inf'"),
        (["bench", "--rounds", "0"], "argument --rounds: must be an integer >= 1, got '0'"),
        (["bench", "--rounds", "-5"], "argument --rounds: must be an integer >= 1, got '-5'"),
    ],
)
def test_bad_values_are_refused_at_parse_time_naming_option_and_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], no_long_work: None
) -> None:
    assert message in refused(capsys, argv)


def test_the_number_types_accept_good_values_and_name_bad_ones() -> None:
    assert non_negative_int("0") == 0 and non_negative_int(" 12 ") == 12
    assert positive_int("1") == 1 and int_at_least(10)("10") == 10
    assert non_negative_float("0") == 0.0 and non_negative_float("1e-3") == 1e-3
    for text in ("-0.5", "nan", "-inf", "inf", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a finite number >= 0, got {text!r}"):
            non_negative_float(text)
    for text in ("-1", "1.0", "", "1e3"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer >= 0, got {text!r}"):
            non_negative_int(text)


# -- the array library ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_a_backend_that_is_not_installed_is_refused_before_the_work(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_long_work: None
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if torch were not installed
    line = refused(capsys, [command, "--backend", "torch"])
    assert "--backend torch cannot run here: import of torch halted" in line
    assert "pip install 'adalora-ref[golden]'" in line


# -- output paths, before the work ------------------------------------------------------------------


def path_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (output path, what the error line must say) for paths nothing can be written to."""
    (tmp_path / "a_file").write_text("in the way")
    cases = {
        "parent is a file": (str(tmp_path / "a_file" / "out"), f"{tmp_path / 'a_file'} is not a directory"),
        "grandparent is a file": (
            str(tmp_path / "a_file" / "sub" / "out"),
            f"{tmp_path / 'a_file'} is not a directory",
        ),
        "empty": ("", "got ''"),
    }
    if Path("/proc/self").is_dir():  # a folder that refuses new files, even to root
        cases["/proc"] = ("/proc/adalora-ref-test/out", "cannot create files in /proc: [Errno")
    return cases


@pytest.mark.parametrize("case", ["parent is a file", "grandparent is a file", "empty", "/proc"])
@pytest.mark.parametrize(("command", "option"), [("bench", "--json"), ("demo", "--plot")])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(
    case: str,
    command: str,
    option: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_long_work: None,
) -> None:
    cases = path_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /proc on this system")
    path, message = cases[case]
    before = listing(tmp_path)
    line = refused(capsys, [command, option, path])
    assert f"argument {option}: " in line and message in line
    assert listing(tmp_path) == before  # nothing created, no probe file left


def test_json_onto_a_directory_or_a_device_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_long_work: None
) -> None:
    line = refused(capsys, ["bench", "--json", str(tmp_path)])
    assert f"argument --json: cannot write {tmp_path}: it is a directory" in line
    if Path("/dev/null").exists():  # replacing it by a regular file would be a disaster as root
        line = refused(capsys, ["bench", "--json", "/dev/null"])
        assert "argument --json: cannot write /dev/null: it exists and is not a regular file" in line


def test_plot_onto_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_long_work: None) -> None:
    (tmp_path / "figures").write_text("not a folder")
    line = refused(capsys, ["demo", "--plot", str(tmp_path / "figures")])
    assert f"argument --plot: cannot write into {tmp_path / 'figures'}: it is not a directory" in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_long_work: None) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        line = refused(capsys, ["bench", "--json", str(locked / "report.json")])
    finally:
        locked.chmod(0o700)
    assert f"cannot create files in {locked}: [Errno {errno.EACCES}]" in line


def test_usable_paths_are_accepted_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("{}")
    assert writable_file(str(tmp_path / "old.json")) == tmp_path / "old.json"
    assert (
        writable_file(str(tmp_path / "new" / "deeper" / "report.json")) == tmp_path / "new" / "deeper" / "report.json"
    )
    assert usable_directory(str(tmp_path / "figures" / "run1")) == tmp_path / "figures" / "run1"
    assert usable_directory(str(tmp_path)) == tmp_path
    assert listing(tmp_path) == ["old.json"]  # the missing folders are made only when writing


# -- a full disk at the end -------------------------------------------------------------------------


def test_bench_json_onto_a_full_disk_is_one_line_and_keeps_the_old_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], disk_full: None
) -> None:
    def quick_report(setup: bench.Setup, sizes: bench.Sizes, *args: object) -> bench_report.Report:
        report = bench_report.Report(setup, sizes, rounds=1)
        report.timings.append(bench_report.Timing("layer forward 32->32", 1e-4, None))
        return report

    monkeypatch.setattr(bench_report, "make_setup", lambda b, d: bench.make_setup(b, d, with_peft=False))
    monkeypatch.setattr(bench_report, "run_benchmarks", quick_report)
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sizes", "small", "--json", str(target)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "| layer forward 32->32 |" in captured.out  # the table came first
    *warnings, error = captured.err.splitlines()  # any warnings: variables pinning a kernel (bench_env)
    assert all(line.startswith("adalora-ref bench: warning: ") for line in warnings)
    assert error == f"adalora-ref bench: error: --json: cannot write {target}: [Errno 28] {os.strerror(28)}"
    assert target.read_text() == '{"old": true}'  # the old report is whole
    assert listing(tmp_path) == ["report.json"]  # and no half-written temporary file


def tiny_demo_result() -> demo.DemoResult:
    """A made-up two-layer result, enough to draw the figures from."""
    history = demo.History(
        steps=[1, 2, 3, 4],
        loss=[1.0, 0.5, 0.2, 0.1],
        budget=[4, 4, 3, 3],
        ranks={"fc1": [2, 2, 1, 1], "fc2": [2, 2, 2, 2]},
        tinit=1,
        final_step=3,
        target_budget=3,
        final_scores={"fc1": np.array([0.3, 0.01]), "fc2": np.array([0.2, 0.1])},
        final_keep={"fc1": [True, False], "fc2": [True, True]},
    )
    run = demo.StudentRun("AdaLoRA 2 -> 1", {"fc1": 1, "fc2": 2}, 1e-3, 12, history)
    return demo.DemoResult({"fc1": 1, "fc2": 2}, run, None, 0.5)


def test_demo_plot_onto_a_full_disk_is_one_line_and_leaves_no_half_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], disk_full: None
) -> None:
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: tiny_demo_result())
    figures = tmp_path / "figures"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--no-progress", "--plot", str(figures)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "planted rank" in captured.out  # the table came first
    budget = figures / "budget.png"
    assert captured.err == f"adalora-ref demo: error: --plot: cannot write {budget}: [Errno 28] {os.strerror(28)}\n"
    assert not any(TEMP_MARK in name for name in listing(tmp_path))
    assert not budget.exists()


# -- help -------------------------------------------------------------------------------------------


def help_entries(text: str) -> dict[str, str]:
    """option -> its help text, from argparse's `options:` section (continuation lines joined)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current is not None and stripped:
            entries[current] += " " + stripped
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_every_option_and_its_default(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert "--seed" in entries or command == "bench"
    assert len(entries) >= 5, entries
    for option, text in entries.items():
        if option != "-h":
            assert "(default: " in text, f"{command} {option}: {text}"
