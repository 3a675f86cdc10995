"""What `adalora-ref conform` prints: the table of cases and, under each failing case, its diagnosis."""

from __future__ import annotations

from typing import TextIO

from .compare import CaseResult


def print_table(results: list[CaseResult], out: TextIO) -> None:
    width = max([len(r.case_id) for r in results] + [4])
    out.write(f"{'case':{width}}  {'checks':>6}  {'largest error':>13}  result\n")
    for r in results:
        status = "pass" if r.passed else "FAIL"
        out.write(f"{r.case_id:{width}}  {r.n_checks:6d}  {r.max_error:13.3g}  {status}\n")
        if not r.passed:
            out.write(f"{'':{width}}  first divergence: {r.first_failure}\n")
    failed = sum(not r.passed for r in results)
    out.write(f"{len(results) - failed} passed, {failed} failed\n")
