"""The benchmark run and its report: `adalora-ref bench`.

    adalora-ref bench [--backend numpy|array_api_strict|torch|cupy] [--dtype float32|float64]
                      [--sizes paper|small] [--only layer allocator train memory] [--rounds N]
                      [--json FILE]

`run_benchmarks` builds the workloads of bench.py, times ours and peft side by side, measures the
copy bandwidth for the allocator's floor and the memory growth over many steps, and returns a
`Report`; `format_report` prints it as a Markdown table with the issue's targets, met or missed,
each with its figure. The header also says what each side ran on (bench_env: BLAS library,
kernel, threads) and warns of environment variables that pin them. A progress bar (tqdm) runs on
stderr while it works, when stderr is a terminal. Without torch and peft the reference side still
runs, and the report says why the peft columns are empty. The pytest-benchmark files in bench/
measure with the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from . import bench_env
from ._backend import BACKENDS
from .bench import SIZES, Setup, Sizes, Workload, allocator_workload, layer_workload, make_setup, train_step_workload
from .bench_measure import MemoryGrowth, copy_bandwidth, memory_growth, steady_malloc, time_sides
from .cli_args import load_backend, positive_int, writable_file, write_output
from .fused import FusedPathError

BENCHMARKS = ("layer", "allocator", "train", "memory")
FWD_BWD_MAX_SLOWDOWN = 1.1  # target (a): ours at most 1.1x peft's time
ALLOCATOR_MIN_SPEEDUP = 2.0  # target (b): at least 2x faster than peft
FLOOR_MAX_RATIO = 2.0  # target (b): within 2x of the bandwidth floor
FUSED_MIN_SPEEDUP = 3.0  # issue 17: the fused allocator step at least 3x faster than peft (and within 2x of the floor)


@dataclass
class Timing:
    """Median seconds of one workload on each side (peft None when it did not run)."""

    name: str
    ours_s: float
    peft_s: float | None

    @property
    def ratio(self) -> float | None:
        """peft / ours: above 1 the reference is faster."""
        return None if self.peft_s is None else self.peft_s / self.ours_s


@dataclass
class Floor:
    """The allocator step against the time its bytes take at the measured copy bandwidth."""

    bytes_moved: int
    bandwidth: float  # bytes per second
    ours_s: float
    fused_s: float | None = None  # the fused step (fused.FusedRankAllocator), timed in the same run

    @property
    def floor_s(self) -> float:
        return self.bytes_moved / self.bandwidth

    @property
    def ratio(self) -> float:
        """ours / floor: 1 is as fast as memory allows."""
        return self.ours_s / self.floor_s

    @property
    def fused_ratio(self) -> float | None:
        """fused / floor, None when the fused step did not run."""
        return None if self.fused_s is None else self.fused_s / self.floor_s


@dataclass
class Target:
    """One of the issue's targets, met or not, with the figure that decides it."""

    name: str
    met: bool
    figure: str


@dataclass
class Report:
    setup: Setup
    sizes: Sizes
    rounds: int
    timings: list[Timing] = field(default_factory=list)
    floor: Floor | None = None
    memory: list[MemoryGrowth] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why
    steady_malloc: bool = False  # glibc's malloc thresholds fixed for the run (bench_measure.steady_malloc)


def measure(workload: Workload, rounds: int) -> Timing:
    """Median times of both sides of `workload` (ours alone when peft is missing), interleaved."""
    sides = [workload.ours] if workload.peft is None else [workload.ours, workload.peft]
    medians = [statistics.median(t) for t in time_sides(sides, rounds)]
    return Timing(workload.name, medians[0], medians[1] if len(medians) > 1 else None)


# -- the run: each function measures one thing into the report (bench/ calls them too) -------


def add_timing(report: Report, workload: Workload) -> Timing:
    timing = measure(workload, report.rounds)
    report.timings.append(timing)
    return timing


def add_floor(report: Report, workload: Workload, timing: Timing, fused: Timing | None = None) -> Floor:
    """The floor of the allocator step `workload` (timed as `timing`, the fused step as `fused`):
    measures the copy bandwidth."""
    assert workload.bytes_moved is not None, f"{workload.name} defines no bytes moved"
    bandwidth = copy_bandwidth(report.setup, report.sizes.copy_mib * 2**20)
    report.floor = Floor(workload.bytes_moved, bandwidth, timing.ours_s, None if fused is None else fused.ours_s)
    return report.floor


def fused_allocator_workload(report: Report) -> Workload | None:
    """The allocator step on fused.FusedRankAllocator, ours alone (peft's side is the readable
    workload's); None, with a note, where it cannot run (numba missing, a backend other than numpy)."""
    try:
        return allocator_workload(report.setup.without_peft("timed with the readable step"), report.sizes, fused=True)
    except (ImportError, FusedPathError) as err:
        report.notes.append(f"the fused allocator step ({err})")
        return None


def add_memory(report: Report, build: Callable[[Setup, Sizes], Workload]) -> MemoryGrowth | None:
    """The memory growth of the reference alone over `sizes.memory_steps` runs of the workload
    `build` makes (peft's side is not built); None, with a note, where it cannot be measured."""
    ours_only = report.setup.without_peft("the reference alone")
    workload = build(ours_only, report.sizes)
    growth = memory_growth(ours_only, workload.ours, workload.name, report.sizes.memory_steps)
    if growth is None:
        report.notes.append(
            f"memory over {workload.name} on {ours_only.backend} (tracemalloc does not see its allocator)"
        )
    else:
        report.memory.append(growth)
    return growth


def _layers(report: Report, n_in: int, n_out: int, tokens: int, backward: bool) -> None:
    add_timing(report, layer_workload(report.setup, n_in, n_out, tokens, report.sizes.layer_r, backward))


def _allocator(report: Report) -> None:
    """The readable step, the fused one and peft's, interleaved in one run, and the floor of both."""
    workload = allocator_workload(report.setup, report.sizes)
    fused = fused_allocator_workload(report)
    if fused is None:
        add_floor(report, workload, add_timing(report, workload))
        return
    sides = [workload.ours, fused.ours] + ([] if workload.peft is None else [workload.peft])
    ours_s, fused_s, *peft_s = [statistics.median(t) for t in time_sides(sides, report.rounds)]
    timing = Timing(workload.name, ours_s, peft_s[0] if peft_s else None)
    fused_timing = Timing(fused.name, fused_s, timing.peft_s)
    report.timings += [timing, fused_timing]
    add_floor(report, workload, timing, fused_timing)


def _train(report: Report) -> None:
    add_timing(report, train_step_workload(report.setup, report.sizes))


def run_benchmarks(
    setup: Setup,
    sizes: Sizes,
    only: Sequence[str] = BENCHMARKS,
    rounds: int | None = None,
    progress: bool | None = None,
) -> Report:
    """Build and measure the chosen benchmarks: layer (forward, fwd+bwd at each size), allocator
    (with its floor), train, memory (growth over allocator steps and over train steps).

    `progress`: a tqdm bar on stderr; None shows it only when stderr is a terminal.
    """
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    rounds = sizes.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    tasks: list[tuple[str, Callable[[Report], None]]] = []
    if "layer" in only:
        for n_in, n_out, tokens in sizes.layers:
            for backward in (False, True):
                label = f"layer {'fwd+bwd' if backward else 'forward'} {n_in}->{n_out}"
                tasks.append(
                    (label, functools.partial(_layers, n_in=n_in, n_out=n_out, tokens=tokens, backward=backward))
                )
    if "allocator" in only:
        tasks.append(("allocator step and floor", _allocator))
    if "train" in only:
        tasks.append(("train step", _train))
    if "memory" in only:
        tasks.append(("memory over allocator steps", functools.partial(add_memory, build=allocator_workload)))
        tasks.append(("memory over train steps", functools.partial(add_memory, build=train_step_workload)))
    report = Report(setup, sizes, rounds, steady_malloc=steady_malloc())
    with tqdm(
        total=len(tasks),
        desc="adalora-ref bench",
        unit="benchmark",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    ) as bar:
        for label, task in tasks:
            bar.set_postfix_str(label)
            task(report)
            bar.update()
    return report


# -- the report -------------------------------------------------------------------------------


def machine_description() -> str:
    """The CPU model, core count and widest vector instructions, from /proc/cpuinfo where there is one."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    instructions = bench_env.cpu_instruction_set()
    return f"{model}, {os.cpu_count()} cores" + ("" if instructions is None else f", {instructions}")


def targets(report: Report) -> list[Target]:
    """The issue's targets that this report has figures for, each met or missed."""
    out = []
    for t in report.timings:
        if t.peft_s is None:
            continue
        if t.name.startswith("layer fwd+bwd"):
            name = f"{t.name}: at most {FWD_BWD_MAX_SLOWDOWN}x peft's time"
            out.append(Target(name, t.ours_s <= FWD_BWD_MAX_SLOWDOWN * t.peft_s, f"{t.ours_s / t.peft_s:.2f}x"))
        if t.name.startswith("allocator step (fused)"):
            name = f"fused allocator step at least {FUSED_MIN_SPEEDUP:g}x faster than peft"
            out.append(Target(name, t.peft_s >= FUSED_MIN_SPEEDUP * t.ours_s, f"{t.peft_s / t.ours_s:.2f}x"))
        elif t.name.startswith("allocator"):
            name = f"allocator step at least {ALLOCATOR_MIN_SPEEDUP:g}x faster than peft"
            out.append(Target(name, t.peft_s >= ALLOCATOR_MIN_SPEEDUP * t.ours_s, f"{t.peft_s / t.ours_s:.2f}x"))
    if report.floor is not None:
        name = f"allocator step within {FLOOR_MAX_RATIO:g}x of the bandwidth floor"
        out.append(Target(name, report.floor.ratio <= FLOOR_MAX_RATIO, f"{report.floor.ratio:.2f}x"))
        fused_ratio = report.floor.fused_ratio
        if fused_ratio is not None:
            name = f"fused allocator step within {FLOOR_MAX_RATIO:g}x of the bandwidth floor"
            out.append(Target(name, fused_ratio <= FLOOR_MAX_RATIO, f"{fused_ratio:.2f}x"))
    for m in report.memory:
        figure = f"{m.growth:+d} bytes between the halves of {m.steps} steps"
        out.append(Target(f"no memory growth over {m.name}", not m.grows, figure))
    return out


def _header(report: Report) -> str:
    s = report.setup
    versions = f"numpy {np.__version__}"
    if s.torch is not None:
        versions += f", torch {s.torch.__version__}, peft {s.peft.__version__} on {s.peft_device}"
    load = f"; load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    malloc = "; glibc malloc thresholds fixed" if report.steady_malloc else ""
    return (
        f"adalora-ref bench: reference on {s.backend} {s.dtype_name}, sizes {report.sizes.name}, "
        f"{report.rounds} rounds; {versions}; {s.threads} threads; {machine_description()}{load}{malloc}; "
        f"{datetime.date.today().isoformat()}\n{bench_env.describe().text}"
    )


def format_report(report: Report) -> str:
    """The report as Markdown: the header, the table of timings, the floor, memory, and the targets."""
    lines = [_header(report)]
    if report.setup.torch is None:
        lines.append(f"peft columns unavailable: {report.setup.no_peft_reason}")
    lines += ["", "| benchmark | ours (ms) | peft (ms) | peft / ours |", "| --- | ---: | ---: | ---: |"]
    for t in report.timings:
        peft_ms = "-" if t.peft_s is None else f"{t.peft_s * 1e3:.3f}"
        ratio = "-" if t.ratio is None else f"{t.ratio:.2f}"
        lines.append(f"| {t.name} | {t.ours_s * 1e3:.3f} | {peft_ms} | {ratio} |")
    if report.floor is not None:
        f = report.floor
        lines += [
            "",
            f"Floor of the allocator step: {f.bytes_moved / 1e6:.1f} MB moved at {f.bandwidth / 1e9:.1f} GB/s "
            f"(array copy) = {f.floor_s * 1e3:.3g} ms; ours {f.ours_s * 1e3:.3f} ms = {f.ratio:.2f}x the floor"
            + ("." if f.fused_s is None else f", fused {f.fused_s * 1e3:.3f} ms = {f.fused_ratio:.2f}x the floor."),
        ]
    if report.memory or report.notes:
        lines.append("")
    for m in report.memory:
        lines.append(
            f"Memory, {m.name}, {m.steps} steps ({m.how}): peak {m.first_peak / 1e6:.2f} MB in the first half, "
            f"{m.second_peak / 1e6:.2f} MB in the second ({m.growth:+d} bytes)."
        )
    lines += [f"Not measured: {note}." for note in report.notes]
    verdicts = targets(report)
    if verdicts:
        lines += ["", "Targets:"] + [f"- {t.name}: {'met' if t.met else 'MISSED'} ({t.figure})" for t in verdicts]
    return "\n".join(lines)


def report_dict(report: Report) -> dict[str, Any]:
    """The report as plain data, for --json (times in seconds, sizes in bytes)."""
    s, f = report.setup, report.floor
    environment = bench_env.describe()
    return {
        "backend": s.backend,
        "dtype": s.dtype_name,
        "sizes": report.sizes.name,
        "rounds": report.rounds,
        "threads": s.threads,
        "numpy": np.__version__,
        "torch": None if s.torch is None else s.torch.__version__,
        "peft": None if s.peft is None else s.peft.__version__,
        "peft_device": None if s.peft is None else s.peft_device,
        "no_peft_reason": s.no_peft_reason,
        "steady_malloc": report.steady_malloc,
        "machine": machine_description(),
        "blas": environment.as_dict(),
        "environment_warnings": environment.warnings,
        "date": datetime.date.today().isoformat(),
        "timings": [dict(dataclasses.asdict(t), peft_over_ours=t.ratio) for t in report.timings],
        "floor": None
        if f is None
        else dict(dataclasses.asdict(f), floor_s=f.floor_s, ours_over_floor=f.ratio, fused_over_floor=f.fused_ratio),
        "memory": [dict(dataclasses.asdict(m), growth=m.growth, grows=m.grows) for m in report.memory],
        "notes": report.notes,
        "targets": [dataclasses.asdict(t) for t in targets(report)],
    }


# -- the command ------------------------------------------------------------------------------


def register_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench",
        help="time the reference against peft on the same work and print the table",
        description="Time the reference and PyTorch peft side by side (layer forward and backward, one "
        "allocator step with its bandwidth floor, one training step, memory growth) and print the ratios.",
    )
    bench.add_argument(
        "--backend",
        choices=BACKENDS,
        default="numpy",
        help="the reference's array library (cupy: peft runs on CUDA) (default: %(default)s)",
    )
    bench.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="floating dtype of both sides (default: %(default)s)",
    )
    bench.add_argument(
        "--sizes",
        choices=tuple(SIZES),
        default="paper",
        help="paper: the issue's shapes; small: toy shapes, a smoke run (default: %(default)s)",
    )
    bench.add_argument(
        "--only",
        nargs="+",
        choices=BENCHMARKS,
        default=list(BENCHMARKS),
        metavar="BENCHMARK",
        help=f"run only these benchmarks, among {', '.join(BENCHMARKS)} (default: all of them)",
    )
    rounds = ", ".join(f"{name} {sizes.rounds}" for name, sizes in SIZES.items())
    bench.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help=f"timed runs of each side, >= 1 (default: by --sizes: {rounds})",
    )
    bench.add_argument(
        "--json",
        metavar="FILE",
        type=writable_file,
        help="also write the report as JSON to FILE, checked before the run (default: no file)",
    )

    def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
        load_backend(bench, args.backend)
        for pinned in bench_env.pinned_variables():
            print(f"adalora-ref bench: warning: {pinned.text}", file=sys.stderr)
        setup = make_setup(args.backend, args.dtype)
        report = run_benchmarks(setup, SIZES[args.sizes], args.only, args.rounds)
        print(format_report(report))
        if args.json is not None:
            write_output(bench, "--json", args.json, (json.dumps(report_dict(report), indent=2) + "\n").encode())
        return 0

    bench.set_defaults(func=run)
