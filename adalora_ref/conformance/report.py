"""What `adalora-ref conform` prints: the table of cases and, under each failing case, its diagnosis.

A diagnosis reads like a compiler error: the first divergence (the first failing check, in full);
then every failing quantity once, in the order the computation produces them, with how many of
its checks fail, where it first fails and its largest error; a quantity that is computed from an
earlier failing one is marked "probably follows from" it, and an independent one gets its own
first message; last, the known mistakes the failures look like, with their SPEC section:

    first divergence: exp_avg_unc of q.lora_A at step 1 differs by 0.176 relative (...)
    3 quantities diverge, in the order they are computed:
      exp_avg_unc     153 of 153 checks fail, first at step 1 (q.lora_A, index (3, 6)), largest error 0.176
      triplet scores  24 of 24 checks fail, first at step 4 (q, index (2,)), largest error 0.176
                      probably follows from exp_avg_unc
    looks like: uncertainty against the previous average (SPEC section 18.6)
"""

from __future__ import annotations

from typing import TextIO

from .results import CaseResult, QuantityDiagnosis, status_counts

INDENT = "    "


def diagnosis_text(result: CaseResult) -> str:
    """The diagnosis of one result as plain text lines (no indentation): what the table prints under it."""
    if result.unsupported is not None:
        return f"unsupported: {result.unsupported}"
    if result.passed:
        return ""
    if result.error is not None:  # nothing to compare: no outputs, an unreadable file, an exception
        return f"not judged: {result.error}"
    lines = [f"first divergence: {result.first_failure}"]
    if result.quantities:
        n = len(result.quantities)
        lines.append(f"{n} quantit{'y diverges' if n == 1 else 'ies diverge'}, in the order they are computed:")
        width = max(len(q.quantity) for q in result.quantities)
        for i, q in enumerate(result.quantities):
            lines.append(f"  {q.quantity:{width}}  {_summary(q)}")
            pad = " " * (width + 4)
            if q.follows_from:
                lines.append(f"{pad}probably follows from {', '.join(q.follows_from)}")
            elif i > 0:  # an independent divergence: its own first message
                lines.append(f"{pad}{q.first.message}")
    if result.n_failed > len(result.failures):
        lines.append(f"({result.n_failed - len(result.failures)} more failing checks not recorded)")
    lines.extend(f"looks like: {m.name} (SPEC section {m.spec})" for m in result.known_mistakes)
    return "\n".join(lines)


def _summary(q: QuantityDiagnosis) -> str:
    """'12 of 21 checks fail, first at step 4 (q, index (2,)), largest error 43.7'."""
    first = q.first
    where = [x for x in (first.check.layer, first.at) if x]
    text = f"{len(q.failures)} of {q.n_checks} checks fail"
    if first.check.step is not None:
        text += f", first at step {first.check.step}"
    if where:
        text += f" ({', '.join(where)})" if first.check.step is not None else f", first at {', '.join(where)}"
    missing = sum(f.missing for f in q.failures)
    if missing:
        text += f", {missing} missing from the outputs" if missing < len(q.failures) else ", missing from the outputs"
    largest = q.max_error
    if largest is not None:
        text += f", largest error {largest:.3g}"
    return text


def print_table(results: list[CaseResult], out: TextIO) -> None:
    """One row per case (checks, largest error, result), its diagnosis indented under it, then the counts."""
    width = max([len(r.case_id) for r in results] + [4])
    out.write(f"{'case':{width}}  {'checks':>6}  {'largest error':>13}  result\n")
    for r in results:
        status = {"pass": "pass", "fail": "FAIL", "unsupported": "unsupported"}[r.status]
        out.write(f"{r.case_id:{width}}  {r.n_checks:6d}  {r.max_error:13.3g}  {status}\n")
        for line in diagnosis_text(r).splitlines():
            out.write(f"{INDENT}{line}\n")
    counts = status_counts(results)
    unsupported = f", {counts['unsupported']} unsupported" if counts["unsupported"] else ""
    out.write(f"{counts['pass']} passed, {counts['fail']} failed{unsupported}\n")
