"""Shared fixtures: the `xp` backend matrix every math test runs on.

`xp` is a `Backend`: an array API namespace plus a floating dtype, parametrized over numpy,
array_api_strict, torch on CPU and cupy, each in float32 and float64. A backend that is not
installed, or cupy without a usable GPU, is skipped with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from adalora_ref._backend import BACKENDS, get_backend, to_numpy


@dataclass(frozen=True)
class Backend:
    """An array namespace and the dtype the test runs in, with helpers to move data in and out."""

    name: str
    xp: Any
    dtype_name: str

    @property
    def dtype(self) -> Any:
        return getattr(self.xp, self.dtype_name)

    @property
    def np_dtype(self) -> Any:
        return np.dtype(self.dtype_name)

    @property
    def rtol(self) -> float:
        """A tolerance for comparing this backend with float64 NumPy math."""
        return 1e-12 if self.dtype_name == "float64" else 2e-5

    def asarray(self, value: Any) -> Any:
        return self.xp.asarray(np.asarray(value, dtype=self.np_dtype), dtype=self.dtype)

    @staticmethod
    def to_numpy(x: Any) -> np.ndarray:
        return np.asarray(to_numpy(x), dtype=np.float64)


def _load(name: str) -> Any:
    try:
        return get_backend(name)
    except ImportError as err:
        pytest.skip(f"backend {name} unavailable: {err}")


@pytest.fixture(
    params=[(b, d) for b in BACKENDS for d in ("float64", "float32")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def xp(request: pytest.FixtureRequest) -> Backend:
    name, dtype_name = request.param
    return Backend(name, _load(name), dtype_name)


@pytest.fixture(params=[b for b in BACKENDS], ids=lambda b: f"{b}-float64")
def xp64(request: pytest.FixtureRequest) -> Backend:
    """Every backend in float64 only: for finite-difference checks that need the precision."""
    return Backend(request.param, _load(request.param), "float64")
