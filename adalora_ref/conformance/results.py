"""What judging a case produces: its failing checks, their grouping into quantities, known mistakes.

Plain data, written by `compare` (the judge), `diagnosis` (grouping and ordering) and `mistakes`
(recognisers), read by `report` (the printed table) and the runner (the JSON report). This module
computes nothing but the counts the reports print (`status_counts`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .case import Check


@dataclass
class CheckFailure:
    """One failing check: its message, and its error (None where no numeric comparison was made:
    an exact check, a missing output, a shape mismatch; inf where the output holds NaN or Inf)."""

    check: Check
    message: str
    error: float | None = None
    at: str | None = None  # where inside the value it first differs: "index (3, 6)", "indices [2, 3]", "lora_alpha"
    missing: bool = False

    def to_json(self) -> dict[str, Any]:
        c = self.check
        return {
            "key": c.key,
            "quantity": c.quantity,
            "step": c.step,
            "layer": c.layer,
            "message": self.message,
            "error": json_number(self.error),
        }


@dataclass
class QuantityDiagnosis:
    """The failing checks of one quantity (e.g. every `exp_avg_unc` check, all steps and layers)."""

    quantity: str
    failures: list[CheckFailure]
    n_checks: int  # how many checks of this quantity the case has
    follows_from: list[str] = field(default_factory=list)  # earlier failing quantities it is computed from

    @property
    def first(self) -> CheckFailure:
        return self.failures[0]

    @property
    def max_error(self) -> float | None:
        """Largest numeric error of its failing checks; None when none was compared numerically."""
        errors = [f.error for f in self.failures if f.error is not None]
        return max(errors) if errors else None

    def to_json(self) -> dict[str, Any]:
        first = self.first.check
        return {
            "quantity": self.quantity,
            "failed": len(self.failures),
            "checks": self.n_checks,
            "first_key": first.key,
            "first_step": first.step,
            "first_layer": first.layer,
            "max_error": json_number(self.max_error),
            "follows_from": self.follows_from,
        }


@dataclass(frozen=True)
class KnownMistake:
    """A common port mistake that a case's outputs look like (docs/SPEC.md section 18)."""

    name: str
    spec: str  # "18.n"

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "spec": self.spec}


@dataclass
class CaseResult:
    """The judgement of one case: counts, every failing check, their diagnosis, or why it was not judged."""

    case_id: str
    kind: str
    dtype: str
    n_checks: int = 0
    n_failed: int = 0
    max_error: float = 0.0  # largest numeric error of the tensor checks, inf when an output holds NaN or Inf
    failures: list[CheckFailure] = field(default_factory=list)  # every failing check, in the case's order
    quantities: list[QuantityDiagnosis] = field(default_factory=list)  # failures grouped, in computation order
    known_mistakes: list[KnownMistake] = field(default_factory=list)
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
            "max_error": json_number(self.max_error),
            "passed": self.passed,
            "status": self.status,
            "unsupported": self.unsupported,
            "first_failure": self.first_failure,
            "failures": [f.to_json() for f in self.failures],
            "quantities": [q.to_json() for q in self.quantities],
            "known_mistakes": [m.to_json() for m in self.known_mistakes],
        }


STATUSES = ("pass", "fail", "unsupported")


def status_counts(results: Iterable[CaseResult]) -> dict[str, int]:
    """How many of `results` have each status: {"pass": n, "fail": n, "unsupported": n}."""
    counts = dict.fromkeys(STATUSES, 0)
    for result in results:
        counts[result.status] += 1
    return counts


def json_number(value: float | None) -> float | str | None:
    """A number for a JSON report: strict JSON has no Infinity, so an infinite error is the string "inf"."""
    if value is not None and not math.isfinite(value):
        return "inf"
    return value
