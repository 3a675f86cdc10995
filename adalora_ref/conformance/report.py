"""What `adalora-ref conform` prints: the table of cases and, under each failing case, its diagnosis."""

from __future__ import annotations

from typing import TextIO

from .compare import CaseResult


def diagnosis_text(result: CaseResult) -> str:
    """The diagnosis of one result as plain text lines (no indentation): what the table prints under it."""
    if result.unsupported is not None:
        return f"unsupported: {result.unsupported}"
    if result.passed:
        return ""
    return f"first divergence: {result.first_failure}"


def print_table(results: list[CaseResult], out: TextIO) -> None:
    width = max([len(r.case_id) for r in results] + [4])
    out.write(f"{'case':{width}}  {'checks':>6}  {'largest error':>13}  result\n")
    for r in results:
        status = {"pass": "pass", "fail": "FAIL", "unsupported": "unsupported"}[r.status]
        out.write(f"{r.case_id:{width}}  {r.n_checks:6d}  {r.max_error:13.3g}  {status}\n")
        if not r.passed:
            for line in diagnosis_text(r).splitlines():
                out.write(f"{'':{width}}  {line}\n")
    counts = {status: sum(r.status == status for r in results) for status in ("pass", "fail", "unsupported")}
    unsupported = f", {counts['unsupported']} unsupported" if counts["unsupported"] else ""
    out.write(f"{counts['pass']} passed, {counts['fail']} failed{unsupported}\n")
