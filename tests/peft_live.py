"""Helpers for the tests that run real PyTorch peft beside the reference.

Each test that uses them calls `require_peft()` first, so without torch and peft (the `golden`
extra) the test is skipped with a reason instead of failing.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest


def require_peft() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch", reason="live peft comparisons need torch (pip install .[golden])")
    peft = pytest.importorskip("peft", reason="live peft comparisons need peft (pip install .[golden])")
    return torch, peft


def t2n(t: Any) -> np.ndarray:
    """A torch tensor as a float64 NumPy array."""
    return t.detach().cpu().double().numpy().copy()  # a copy: never alias a tensor torch updates in place


def make_torch_stack(specs: list[tuple[str, int, int, bool, bool]], dtype: Any) -> Any:
    """A torch module holding one base layer per (name, in, out, bias, conv1d) spec.

    conv1d=True makes a transformers Conv1D (weight stored (in, out): peft's fan_in_fan_out case).
    Its forward is not used: tests call the wrapped layers one by one or through `LossModel`.
    """
    torch, _ = require_peft()
    from transformers.pytorch_utils import Conv1D

    root = torch.nn.Module()
    for name, n_in, n_out, bias, conv1d in specs:
        if conv1d:
            layer = Conv1D(n_out, n_in)
            if not bias:
                layer.bias = None
        else:
            layer = torch.nn.Linear(n_in, n_out, bias=bias)
        root.add_module(name, layer.to(dtype))
    return root


class LossModel:
    """Makes a torch module whose forward returns an object with `.loss`: peft's orth-term path."""

    @staticmethod
    def wrap(inner: Any, loss_fn: Any) -> Any:
        torch, _ = require_peft()

        class _Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                return SimpleNamespace(loss=loss_fn(self.inner, x))

        return _Model()
