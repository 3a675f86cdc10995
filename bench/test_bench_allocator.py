"""(b) One allocator step at the paper's scale (72 triplets), ours and peft; (d) its bandwidth floor;
and the reference's memory over many allocator steps.

Targets: at least 2x faster than peft (the fused step, fused.FusedRankAllocator: 3x); within 2x of the
floor (the bytes the step must move over the bandwidth of a large array copy, measured in the same run);
no memory growth from step to step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest

from adalora_ref.bench import allocator_workload
from adalora_ref.bench_report import Report, add_floor, add_memory
from adalora_ref.fused import FusedPathError


def test_allocator_step(record, benchmark: Any, report: Report) -> None:
    workload = allocator_workload(report.setup, report.sizes)
    floor = add_floor(report, workload, record(workload))
    benchmark.extra_info.update(
        bytes_moved=floor.bytes_moved,
        bandwidth_GB_per_s=floor.bandwidth / 1e9,
        floor_ms=floor.floor_s * 1e3,
        ours_over_floor=floor.ratio,
    )


def test_fused_allocator_step(record, benchmark: Any, report: Report) -> None:
    """The same step on fused.FusedRankAllocator against peft (targets: 3x faster than peft, within
    2x of the floor, whose fused figure it fills in when test_allocator_step measured the floor)."""
    try:
        workload = allocator_workload(report.setup, report.sizes, fused=True)
    except (ImportError, FusedPathError) as err:
        pytest.skip(f"the fused allocator step cannot run here: {err}")
    timing = record(workload)
    if report.floor is not None:
        report.floor = dataclasses.replace(report.floor, fused_s=timing.ours_s)
        benchmark.extra_info.update(floor_ms=report.floor.floor_s * 1e3, fused_over_floor=report.floor.fused_ratio)


def test_allocator_memory(report: Report) -> None:
    """The peak of the second half of the steps against the first: no array may outlive its step."""
    growth = add_memory(report, allocator_workload)
    if growth is None:
        pytest.skip(report.notes[-1])
    assert not growth.grows, f"{growth.growth:+d} bytes at the peak of the second half of {growth.steps} steps"


def test_fused_allocator_memory(report: Report) -> None:
    """The fused step keeps two pairs of averages per tensor and a new ipt each step: no more."""
    try:
        growth = add_memory(report, functools.partial(allocator_workload, fused=True))
    except (ImportError, FusedPathError) as err:
        pytest.skip(f"the fused allocator step cannot run here: {err}")
    if growth is None:
        pytest.skip(report.notes[-1])
    assert not growth.grows, f"{growth.growth:+d} bytes at the peak of the second half of {growth.steps} steps"
