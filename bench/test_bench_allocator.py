"""(b) One allocator step at the paper's scale (72 triplets), ours and peft; (d) its bandwidth floor;
and the reference's memory over many allocator steps.

Targets: at least 2x faster than peft; within 2x of the floor (the bytes the step must move over
the bandwidth of a large array copy, measured in the same run); no memory growth from step to step.
"""

from __future__ import annotations

from typing import Any

import pytest

from adalora_ref.bench import allocator_workload
from adalora_ref.bench_report import Report, add_floor, add_memory


def test_allocator_step(record, benchmark: Any, report: Report) -> None:
    workload = allocator_workload(report.setup, report.sizes)
    floor = add_floor(report, workload, record(workload))
    benchmark.extra_info.update(
        bytes_moved=floor.bytes_moved,
        bandwidth_GB_per_s=floor.bandwidth / 1e9,
        floor_ms=floor.floor_s * 1e3,
        ours_over_floor=floor.ratio,
    )


def test_allocator_memory(report: Report) -> None:
    """The peak of the second half of the steps against the first: no array may outlive its step."""
    growth = add_memory(report, allocator_workload)
    if growth is None:
        pytest.skip(report.notes[-1])
    assert not growth.grows, f"{growth.growth:+d} bytes at the peak of the second half of {growth.steps} steps"
