"""(a) The SVD layer: forward, and forward plus backward (dL/dx, dL/dA, dL/dE, dL/dB), ours and peft.

Target: ours' forward + backward at most 1.1x peft's time.
"""

from __future__ import annotations

import pytest

from adalora_ref.bench import layer_workload
from adalora_ref.bench_report import Report


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "fwd+bwd"])
def test_layer(record, report: Report, layer_shape: tuple[int, int, int], backward: bool) -> None:
    n_in, n_out, tokens = layer_shape
    record(layer_workload(report.setup, n_in, n_out, tokens, report.sizes.layer_r, backward))
