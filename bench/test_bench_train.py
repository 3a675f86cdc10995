"""(c) One whole training step of the MLP (forward, loss + orthogonal term, backward, AdamW,
update_and_allocate), ours and peft; and the reference's memory over many training steps."""

from __future__ import annotations

import pytest

from adalora_ref.bench import train_step_workload
from adalora_ref.bench_report import Report, add_memory


def test_train_step(record, report: Report) -> None:
    record(train_step_workload(report.setup, report.sizes))


def test_train_memory(report: Report) -> None:
    growth = add_memory(report, train_step_workload)
    if growth is None:
        pytest.skip(report.notes[-1])
    assert not growth.grows, f"{growth.growth:+d} bytes at the peak of the second half of {growth.steps} steps"
