"""Grouping a case's failing checks into quantities, root cause first (docs/SPEC.md section 16).

A case's checks are listed in the order the computation produces them (SPEC 13.3, 14): within a
step importance, budget, flag, scores, threshold, decisions, E; steps in order. `group_failures`
makes one group per failing quantity (`Check.quantity`, over all its steps and layers: "ipt" is
one quantity however many layers and steps fail), ordered by the position of its first failing
check, so the first group is the first divergence. A group is marked "probably follows from P"
when P failed earlier and the group's quantity is computed from P, directly or through others,
unless a recognised mistake (mistakes.py) makes the group's quantity wrong itself: a port that
keeps rows by count has a wrong rank pattern whatever its scores.

What each quantity is computed from, by case kind (the table below, DEPENDS_ON):

    layer, conv_layer  output y <- scaling, ranknum
                       input gradient, gradient of lora_A / lora_E / lora_B <- output y (autograd
                           differentiates the forward), scaling, ranknum
                       delta weight <- scaling, ranknum; merged <- delta; unmerged <- merged
    orth               regularizer gradients <- regularizer value (one formula, one constant)
    schedule           budget <- initial budget, target budget; mask flag <- nothing
    allocator          exp_avg_ipt <- ipt; exp_avg_unc <- ipt, exp_avg_ipt
                       triplet scores <- exp_avg_ipt, exp_avg_unc
                       threshold <- triplet scores, budget
                       rank pattern <- threshold, triplet scores, masking flag
                       lora_E after update_and_allocate <- rank pattern, masking flag
                       (ipt, budget and the masking flag depend on nothing checked: the parameters
                       and gradients of every step are inputs)
    trajectory         task loss, orthogonal term <- the parameters the forward meets, as earlier
                           steps left them: rank pattern, non-zero rows of lora_E, ranknum,
                           lora_A / lora_E / lora_B after the optimizer step
                       loss <- task loss, orthogonal term (and those parameters)
                       lora_* after the optimizer step <- loss (its gradients), the parameters
                       ipt <- loss, the parameters; the EMAs, scores and threshold as in allocator
                       rank pattern <- threshold, triplet scores, loss, budget
                       non-zero rows of lora_E <- rank pattern, loss, lora_E after the optimizer step
                       final lora_A / lora_E / lora_B <- loss and the parameters
                       final base parameter <- loss
                       saved tensor <- final lora_*, final base parameter, rank pattern
                       (budget and ranknum depend on nothing: a schedule and a constant)
    checkpoint         output after loading <- rank after loading, ranknum after loading
    config             saved adapter_config fields <- accepted

A quantity this table does not know (a case of another kind) is listed in order, never marked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable

from .case import Case
from .results import CheckFailure, QuantityDiagnosis

_LAYER = {
    "output y": ("scaling", "ranknum"),
    "input gradient": ("output y", "scaling", "ranknum"),
    "gradient of lora_A": ("output y", "scaling", "ranknum"),
    "gradient of lora_E": ("output y", "scaling", "ranknum"),
    "gradient of lora_B": ("output y", "scaling", "ranknum"),
}
ORTH_TERM = "orthogonal term (orth_reg_weight * R)"
# what a trajectory's forward meets: the parameters as the earlier steps left them
_PARAMETERS = (
    "rank pattern",
    "non-zero rows of lora_E",
    "ranknum",
    "lora_A after the optimizer step",
    "lora_E after the optimizer step",
    "lora_B after the optimizer step",
)
_FINAL_TRIPLET = ("loss", *_PARAMETERS)
# the importance's averages, the scores and the threshold: the same in an allocator and a trajectory case
_SCORING = {
    "exp_avg_ipt": ("ipt",),
    "exp_avg_unc": ("ipt", "exp_avg_ipt"),
    "triplet scores": ("exp_avg_ipt", "exp_avg_unc"),
    "threshold": ("triplet scores", "budget"),
}

DEPENDS_ON: dict[str, dict[str, tuple[str, ...]]] = {
    "layer": {
        **_LAYER,
        "delta weight": ("scaling", "ranknum"),
        "merged base weight": ("delta weight",),
        "unmerged base weight": ("merged base weight",),
    },
    "conv_layer": {
        **_LAYER,
        "delta weight (a kernel)": ("scaling", "ranknum"),
        "merged base kernel": ("delta weight (a kernel)",),
        "unmerged base kernel": ("merged base kernel",),
    },
    "orth": {
        "regularizer gradient of lora_A": ("regularizer value",),
        "regularizer gradient of lora_B": ("regularizer value",),
    },
    "schedule": {"budget": ("initial budget", "target budget")},
    "allocator": {
        **_SCORING,
        "rank pattern": ("threshold", "triplet scores", "masking flag"),
        "lora_E after update_and_allocate": ("rank pattern", "masking flag"),
    },
    "trajectory": {
        "task loss": _PARAMETERS,
        ORTH_TERM: _PARAMETERS,
        "loss": ("task loss", ORTH_TERM, *_PARAMETERS),
        **{f"lora_{p} after the optimizer step": ("loss", *_PARAMETERS) for p in "AEB"},
        "ipt": ("loss", *_PARAMETERS),
        **_SCORING,
        "rank pattern": ("threshold", "triplet scores", "loss", "budget"),
        "non-zero rows of lora_E": ("rank pattern", "loss", "lora_E after the optimizer step"),
        "final lora_A": _FINAL_TRIPLET,
        "final lora_E": _FINAL_TRIPLET,
        "final lora_B": _FINAL_TRIPLET,
        "final base parameter": ("loss",),
        "saved tensor": ("final lora_A", "final lora_E", "final lora_B", "final base parameter", "rank pattern"),
    },
    "checkpoint": {"output after loading": ("rank after loading", "ranknum after loading")},
    "config": {"saved adapter_config fields": ("accepted",)},
}


def ancestors(kind: str, quantity: str) -> set[str]:
    """Every quantity `quantity` is computed from, directly or through others (cycles allowed:
    a trajectory's loss and rank pattern feed each other from step to step)."""
    table = DEPENDS_ON.get(kind, {})
    seen: set[str] = set()
    todo = list(table.get(quantity, ()))
    while todo:
        q = todo.pop()
        if q not in seen:
            seen.add(q)
            todo.extend(table.get(q, ()))
    seen.discard(quantity)
    return seen


def group_failures(
    case: Case, failures: Iterable[CheckFailure], roots: Collection[str] = ()
) -> list[QuantityDiagnosis]:
    """One group per failing quantity, first divergence first, each marked with the earlier failing
    quantities it is computed from (only those that do not themselves follow from another). Quantities
    in `roots` (those a recognised mistake makes wrong itself) are never marked."""
    checks_of = Counter(check.quantity for check in case.checks)
    groups: dict[str, QuantityDiagnosis] = {}
    for failure in failures:  # in the case's order, so groups come in the order of their first failure
        q = failure.check.quantity
        if q not in groups:
            groups[q] = QuantityDiagnosis(q, [], checks_of[q])
        groups[q].failures.append(failure)
    ordered = list(groups.values())
    for i, group in enumerate(ordered):
        sources = set() if group.quantity in roots else ancestors(case.kind, group.quantity)
        group.follows_from = [
            earlier.quantity for earlier in ordered[:i] if earlier.quantity in sources and not earlier.follows_from
        ]
    return ordered
