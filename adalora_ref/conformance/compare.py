"""Judging outputs against a golden case, check by check, in the case's order.

Tensor checks use the normwise relative error

    err = max|actual - expected| / max|expected|     (an absolute error when expected is all zeros)

(inf when the output holds NaN or Inf) and pass when err <= rtol (the check's own rtol, else the
case's default for its dtype). Exact checks (budgets, flags, rank patterns, configs) pass only on
equality of JSON values, types included: where the golden value is a boolean only `true`/`false`
passes, where it is an integer only an integer (not `16.0`, not `true`); where it is a float any
number of that value does (`4` for `4.0`), and `scaling` is a real number whatever its golden type.
A failing exact check names only the indices or fields that differ.

`compare` records every failing check, then groups them (diagnosis.py) and looks for known port
mistakes (mistakes.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .case import Case, Check
from .diagnosis import group_failures
from .mistakes import caused_by, recognise
from .results import CaseResult, CheckFailure

__all__ = ["DEFAULT_RTOL", "MISSING", "compare", "differences", "judge", "tensor_error"]

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4}
MISSING = object()  # an output key the outputs do not have (None is a legitimate JSON value)
# peft's scaling is lora_alpha itself (an int 8, or float(r) = 3.0): a real number in any port
REAL_NUMBER_QUANTITIES = ("scaling",)
SHOWN_DIFFERENCES = 6  # a failing exact check names at most this many differing indices or fields


def compare(case: Case, actual: Mapping[str, Any], *, keep: int | None = None) -> CaseResult:
    """Judge `actual` (key -> value) against every check of `case`, in order.

    Every failing check is recorded (only the first `keep` when `keep` is given: the counts stay
    whole, the diagnosis then covers the recorded ones).
    """
    result = CaseResult(case.id, case.kind, case.dtype, n_checks=len(case.checks))
    default = DEFAULT_RTOL[case.dtype]
    for check in case.checks:
        rtol = check.rtol if check.rtol is not None else default
        error, failure = judge(check, actual.get(check.key, MISSING), case.expected[check.key], rtol)
        if error is not None:
            result.max_error = max(result.max_error, error)
        if failure is not None:
            result.n_failed += 1
            if keep is None or len(result.failures) < keep:
                result.failures.append(failure)
    result.known_mistakes = recognise(case, actual, result.failures)
    result.quantities = group_failures(case, result.failures, roots=caused_by(result.known_mistakes))
    return result


def judge(check: Check, actual: Any, expected: Any, rtol: float) -> tuple[float | None, CheckFailure | None]:
    """(numeric error or None, the failure or None when the check passes) for one check."""
    if actual is MISSING:
        return None, CheckFailure(check, f"{check.where()}: missing from the outputs (key {check.key!r})", missing=True)
    if check.type == "exact":
        return None, _judge_exact(check, actual, expected)
    try:
        numbers = np.asarray(actual, dtype=np.float64)
    except (TypeError, ValueError):
        return None, CheckFailure(check, f"{check.where()} is {_show(_normalize(actual))}, not an array of numbers")
    return _judge_tensor(check, numbers, np.asarray(expected), rtol)


# --- tensors -------------------------------------------------------------------------------------


def tensor_error(actual: Any, expected: Any) -> tuple[float, tuple[int, ...] | None]:
    """(normwise relative error, index of the largest difference); absolute when expected is all zeros,
    inf (at the first non-finite element) when actual holds NaN or Inf."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.size == 1 and e.size == 1:
        a, e = a.reshape(1), e.reshape(1)
    if a.size == 0:
        return 0.0, None
    if not np.all(np.isfinite(a)):
        return math.inf, tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
    diff = np.abs(a - e)  # (shape of the tensor)
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    scale = float(np.max(np.abs(e)))
    err = float(diff[index]) / scale if scale > 0 else float(diff[index])
    return (math.inf if math.isnan(err) else err), index


def _judge_tensor(check: Check, a: np.ndarray, e: np.ndarray, rtol: float) -> tuple[float | None, CheckFailure | None]:
    if a.size == 1 and e.size == 1:  # a scalar: stored with shape (1,), a port may write shape ()
        a, e = a.reshape(1), e.reshape(1)
    if a.shape != e.shape:
        message = f"{check.where()} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        if a.shape == (0,) and e.size == 0:  # most likely a JSON []: SPEC 15's object form keeps the shape
            message += f' (a JSON [] is shape (0,): write {{"shape": {list(e.shape)}, "data": []}})'
        return None, CheckFailure(check, message)
    err, index = tensor_error(a, e)
    if err <= rtol:
        return err, None
    assert index is not None  # an empty tensor has error 0
    where = check.where()
    at = f"index {index}" if e.size > 1 else None
    place = f"at {at}: " if at else ""
    got, want = float(a[index]), float(e[index])
    if not math.isfinite(got):
        message = f"{where} is not finite ({place}{got}, expected {want:.10g})"
    elif not np.any(e):
        message = f"{where} differs by {err:.3g} absolute (expected all zeros; {place}{got:.10g}; tolerance {rtol:.1g})"
    else:
        message = (
            f"{where} differs by {err:.3g} relative ({place}{got:.10g}, expected {want:.10g}; tolerance {rtol:.1g})"
        )
    return err, CheckFailure(check, message, error=err, at=at)


# --- exact values ----------------------------------------------------------------------------------


def _judge_exact(check: Check, actual: Any, expected: Any) -> CheckFailure | None:
    if isinstance(actual, np.ndarray):
        return CheckFailure(
            check,
            f"{check.where()} was written as a tensor of shape {tuple(actual.shape)}; an exact check is a JSON value "
            f"in the case's .json file (SPEC section 15), expected {_show(expected)}",
        )
    real = check.quantity in REAL_NUMBER_QUANTITIES
    diffs = differences(_normalize(actual), expected, real_numbers=real)
    if not diffs:
        return None
    where = check.where()
    if len(diffs) == 1 and diffs[0][0] == "":  # the value as a whole
        _, a, e = diffs[0]
        return CheckFailure(check, f"{where} is {_versus(a, e, real)}")
    shown = diffs[:SHOWN_DIFFERENCES]
    more = f" (and {len(diffs) - len(shown)} more)" if len(diffs) > len(shown) else ""
    if all(path.startswith("[") and path.count("[") == 1 for path, _, _ in diffs):  # a list, element by element
        indices = ", ".join(path[1:-1] for path, _, _ in shown)
        got = ", ".join(_show(a) for _, a, _ in shown)
        want = ", ".join(_show(e) for _, _, e in shown)
        odd = next(((a, e) for _, a, e in shown if _type_differs(a, e)), None)
        note = f" ({_plural(odd[0])} where {_plural(odd[1])} are expected)" if odd else ""
        message = f"{where} differs at indices [{indices}]{more}: [{got}], expected [{want}]{note}"
        return CheckFailure(check, message, at=f"indices [{indices}]")
    parts = [f"{path}: {_versus(a, e)}" for path, a, e in shown]
    return CheckFailure(check, f"{where} differs in {'; '.join(parts)}{more}", at=shown[0][0])


ABSENT = object()  # a field one side of a dict comparison does not have


def differences(
    actual: Any, expected: Any, *, real_numbers: bool = False, path: str = ""
) -> list[tuple[str, Any, Any]]:
    """(path, actual, expected) for every place the two JSON values differ, in expected's order.

    Paths: "" (the whole value), "[3]" (a list index), "lora_alpha" or "fc3.lora_E[4]" (fields).
    Lists of different lengths, and values of different JSON types, differ as a whole.
    """
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        out = []
        for key in [*expected, *(k for k in actual if k not in expected)]:
            sub = f"{path}.{key}" if path else str(key)
            a, e = actual.get(key, ABSENT), expected.get(key, ABSENT)
            if a is ABSENT or e is ABSENT:
                out.append((sub, a, e))
            else:
                out.extend(differences(a, e, real_numbers=real_numbers, path=sub))
        return out
    if isinstance(expected, list) and isinstance(actual, list) and len(actual) == len(expected):
        out = []
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            out.extend(differences(a, e, real_numbers=real_numbers, path=f"{path}[{i}]"))
        return out
    return [] if _same_scalar(actual, expected, real_numbers) else [(path, actual, expected)]


def _same_scalar(actual: Any, expected: Any, real_numbers: bool) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, int) and not real_numbers:
        return isinstance(actual, int) and actual == expected
    if isinstance(expected, int | float):
        return isinstance(actual, int | float) and actual == expected
    return type(actual) is type(expected) and actual == expected


def _type_of(value: Any) -> str:
    """The JSON type of a value, as a message names it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _plural(value: Any) -> str:
    """'integers', 'booleans', ... for a value's JSON type."""
    kind = _type_of(value).split(" ")[-1]
    return "nulls" if kind == "null" else kind + "s"


def _type_differs(actual: Any, expected: Any, real_numbers: bool = False) -> bool:
    """True where a value's JSON type is what makes it differ (16.0 for 16, 1 for true); an integer
    where a float is expected (or any number for a real-number quantity) differs by value only."""
    if actual is ABSENT or expected is ABSENT or _type_of(actual) == _type_of(expected):
        return False
    numbers = {_type_of(actual), _type_of(expected)} <= {"an integer", "a float"}
    return not (numbers and (real_numbers or isinstance(expected, float)))


def _versus(actual: Any, expected: Any, real_numbers: bool = False) -> str:
    """'16.0 (a float), expected the integer 16', or '17, expected 16'."""
    if actual is ABSENT:
        return f"absent, expected {_show(expected)}"
    if expected is ABSENT:
        return f"{_show(actual)}, not expected (no such field)"
    if _type_differs(actual, expected, real_numbers):
        kind = _type_of(expected)
        named = f"the {kind.split(' ', 1)[1]} " if kind in ("a boolean", "an integer", "a float", "a string") else ""
        return f"{_show(actual)} ({_type_of(actual)}), expected {named}{_show(expected)}"
    return f"{_show(actual)}, expected {_show(expected)}"


def _show(value: Any) -> str:
    """A JSON value as a port author wrote it: true/false/null, floats to 10 digits, long lists cut."""
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:.10g}"
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, list):
        items = ", ".join(_show(v) for v in value[:12])
        return f"[{items}]" if len(value) <= 12 else f"[{items}, ...] ({len(value)} items)"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_show(v)}" for k, v in value.items()) + "}"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _normalize(value: Any) -> Any:
    """JSON-comparable form: numpy scalars and arrays become Python numbers and lists, tuples lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    return value
