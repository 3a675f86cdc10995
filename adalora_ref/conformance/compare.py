"""Judging outputs against a golden case, check by check, in the case's order.

Tensor checks use the normwise relative error

    err = max|actual - expected| / max|expected|        (max|actual| when expected is all zeros)

and pass when err <= rtol (the check's own rtol, else the case's default for its dtype). Exact
checks (budgets, masks, rank patterns, flags) pass only on equality. The first failing check is
what a port should fix first: later ones often follow from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .case import Case, Check

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4}
MISSING = object()  # an output key the outputs do not have (None is a legitimate JSON value)


@dataclass
class CheckFailure:
    check: Check
    message: str


@dataclass
class CaseResult:
    case_id: str
    kind: str
    dtype: str
    n_checks: int = 0
    n_failed: int = 0
    max_error: float = 0.0
    failures: list[CheckFailure] = field(default_factory=list)
    error: str | None = None  # the run itself failed (an exception), not a comparison
    unsupported: str | None = None  # the port declared this case unsupported (port.json): the reason

    @property
    def passed(self) -> bool:
        return self.unsupported is None and self.error is None and self.n_failed == 0

    @property
    def status(self) -> str:
        """ "pass", "fail" or "unsupported" (declared by the port; not a failure)."""
        if self.unsupported is not None:
            return "unsupported"
        return "pass" if self.passed else "fail"

    @property
    def first_failure(self) -> str | None:
        if self.error is not None:
            return self.error
        return self.failures[0].message if self.failures else None

    def to_json(self) -> dict[str, Any]:
        return {
            "case": self.case_id,
            "kind": self.kind,
            "dtype": self.dtype,
            "checks": self.n_checks,
            "failed": self.n_failed,
            "max_error": self.max_error,
            "passed": self.passed,
            "status": self.status,
            "unsupported": self.unsupported,
            "first_failure": self.first_failure,
        }


def tensor_error(actual: np.ndarray, expected: np.ndarray) -> tuple[float, tuple[int, ...] | None]:
    """(normwise relative error, index of the largest difference)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.size == 0:
        return 0.0, None
    if not np.all(np.isfinite(a)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        return math.inf, bad
    diff = np.abs(a - e)
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    scale = float(np.max(np.abs(e)))
    largest = float(diff[index]) if diff.ndim else float(diff)
    return (largest / scale if scale > 0 else largest), index


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, list) and len(value) > 12:
        return f"[{', '.join(map(str, value[:12]))}, ...] ({len(value)} items)"
    return str(value)


def judge(check: Check, actual: Any, expected: Any, rtol: float) -> tuple[float, str | None]:
    """(error, failure message or None) for one check."""
    where = check.where()
    if actual is MISSING:
        return math.inf, f"{where}: missing from the outputs (key {check.key!r})"
    if check.type == "exact":
        if _normalize(actual) == _normalize(expected):
            return 0.0, None
        return math.inf, f"{where} is {_fmt(_normalize(actual))}, expected {_fmt(_normalize(expected))}"
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.size == 1 and e.size == 1:  # a scalar: stored with shape (1,), a port may write shape ()
        a, e = a.reshape(1), e.reshape(1)
    if a.shape != e.shape:
        return math.inf, f"{where} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    err, index = tensor_error(a, e)
    if err <= rtol:
        return err, None
    if index is None or e.ndim == 0:
        detail = f"{float(a):.10g}, expected {float(e):.10g}"
    else:
        detail = f"at index {index}: {float(a[index]):.10g}, expected {float(e[index]):.10g}"
    return err, f"{where} differs by {err:.3g} relative ({detail}; tolerance {rtol:.1g})"


def _normalize(value: Any) -> Any:
    """JSON-comparable form: numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    return value


def compare(case: Case, actual: Mapping[str, Any], *, keep: int = 5) -> CaseResult:
    """Judge `actual` (key -> value) against every check of `case`, in order."""
    result = CaseResult(case.id, case.kind, case.dtype)
    default = DEFAULT_RTOL[case.dtype]
    for check in case.checks:
        result.n_checks += 1
        rtol = check.rtol if check.rtol is not None else default
        err, message = judge(check, actual.get(check.key, MISSING), case.expected[check.key], rtol)
        if check.type == "tensor" and math.isfinite(err):
            result.max_error = max(result.max_error, err)
        if message is not None:
            result.n_failed += 1
            if len(result.failures) < keep:
                result.failures.append(CheckFailure(check, message))
    return result
