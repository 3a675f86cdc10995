"""The pytest-benchmark suite: ours and peft side by side on the workloads of adalora_ref/bench.py.

    python -m pytest bench/                        numpy and cupy (cupy skips without a GPU), paper sizes
    python -m pytest bench/ --bench-backend torch --bench-sizes small --bench-rounds 3

Each timing test builds one workload, times both sides interleaved (`bench_report.measure`, the
function `adalora-ref bench` uses) and records the medians and the ratio peft / ours in
`benchmark.extra_info`; pytest-benchmark's own statistics are those of ours (`benchmark.pedantic`).
The memory tests assert that the reference's peak does not grow from step to step. At the end of
the session the table of each backend is printed with the issue's targets, met or missed. No test
fails on a timing: a missed target is a figure in the table, not a red test.

Not part of the default `python -m pytest` (whose testpaths are tests/).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from adalora_ref._backend import BACKENDS
from adalora_ref.bench import SIZES, Setup, Side, Sizes, Workload, make_setup
from adalora_ref.bench_measure import steady_malloc
from adalora_ref.bench_report import Report, Timing, add_timing, format_report

_REPORTS: dict[str, Report] = {}
"""backend -> what this session measured on it, printed in the terminal summary."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("adalora-ref bench")
    group.addoption(
        "--bench-backend",
        default="numpy,cupy",
        help=f"comma-separated backends for the reference, among {', '.join(BACKENDS)} (default numpy,cupy; "
        "cupy runs peft on CUDA and skips where no GPU is usable)",
    )
    group.addoption("--bench-sizes", default="paper", choices=tuple(SIZES), help="workload sizes (default paper)")
    group.addoption("--bench-dtype", default="float32", choices=("float32", "float64"))
    group.addoption("--bench-rounds", type=int, default=None, help="timed runs of each side (default: by sizes)")


def _sizes(config: pytest.Config) -> Sizes:
    return SIZES[config.getoption("--bench-sizes")]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        names = [b.strip() for b in metafunc.config.getoption("--bench-backend").split(",") if b.strip()]
        unknown = sorted(set(names) - set(BACKENDS))
        if unknown or not names:
            raise pytest.UsageError(f"--bench-backend: unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
        metafunc.parametrize("backend", names, scope="session")
    if "layer_shape" in metafunc.fixturenames:
        shapes = _sizes(metafunc.config).layers
        metafunc.parametrize("layer_shape", shapes, ids=[f"{i}x{o}x{t}" for i, o, t in shapes])


def setup_or_skip(backend: str, dtype_name: str) -> Setup:
    """The setup of `backend`, or a skip saying why it cannot run here (cupy without a GPU)."""
    try:
        return make_setup(backend, dtype_name)
    except ImportError as err:
        pytest.skip(f"backend {backend} cannot run here: {err}")


@pytest.fixture(scope="session")
def report(backend: str, request: pytest.FixtureRequest) -> Report:
    """This session's report for `backend`, which every benchmark of that backend adds to."""
    if backend not in _REPORTS:
        config = request.config
        setup = setup_or_skip(backend, config.getoption("--bench-dtype"))
        sizes = _sizes(config)
        rounds = config.getoption("--bench-rounds") or sizes.rounds
        _REPORTS[backend] = Report(setup, sizes, rounds, steady_malloc=steady_malloc())
    return _REPORTS[backend]


def _run_and_sync(side: Side) -> Callable[[], None]:
    def run() -> None:
        side.run()
        side.sync()

    return run


@pytest.fixture
def record(benchmark: Any, report: Report) -> Callable[[Workload], Timing]:
    """`record(workload)`: time both sides interleaved, add the timing to the report and to
    benchmark.extra_info, and let pytest-benchmark time the reference's side for its own statistics."""

    def record_workload(workload: Workload) -> Timing:
        timing = add_timing(report, workload)
        benchmark.group = workload.name
        benchmark.extra_info.update(
            backend=report.setup.backend,
            dtype=report.setup.dtype_name,
            threads=report.setup.threads,
            ours_median_ms=timing.ours_s * 1e3,
            peft_median_ms=None if timing.peft_s is None else timing.peft_s * 1e3,
            peft_over_ours=timing.ratio,
            peft_missing=report.setup.no_peft_reason,
        )
        benchmark.pedantic(_run_and_sync(workload.ours), rounds=report.rounds, iterations=1, warmup_rounds=1)
        return timing

    return record_workload


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for backend, report in _REPORTS.items():
        if report.timings or report.memory or report.floor:
            terminalreporter.write_sep("=", f"adalora-ref against peft, reference on {backend}")
            terminalreporter.write_line(format_report(report))
