"""Recognising common port mistakes in a case's outputs (docs/SPEC.md section 18).

Each mistake has a recogniser: a test over one case's failing checks and the port's own outputs
that says "these divergences are what this mistake produces". Recognisers are specific: most
recompute what the mistaken formula gives from the port's own outputs (its EMAs, its patterns,
its budget) or from the case's inputs, and match only when the port agrees with the mistake and
not with peft. Checking against the port's own values keeps a recogniser valid when the port has
other mistakes too. A correct port has no failing checks and so never matches one.

`recognise(case, actual, failures)` returns the mistakes matched, in SPEC order. This module
judges nothing: compare.py decides what fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._backend import get_backend, is_integer, is_real
from ..allocator import PARTS, budget_schedule
from ..layer import SVDTriplet
from ..orth import orthogonal_regularizer
from .case import Case
from .diagnosis import ORTH_TERM
from .reference import run_case
from .results import CheckFailure, KnownMistake

AGREES = {"float64": 1e-7, "float32": 1e-3}  # how closely a port must match a recomputed mistake
ROUNDING = 1e-6  # float32 rounding (2**-24 = 6e-8 relative per constant) stays under this in a float64 case
E_AFTER = ("lora_E after update_and_allocate", "non-zero rows of lora_E")  # E after masking: allocator, trajectory
EXACTLY = 1e-12  # agreement to float64 rounding: tells a float32-rounded constant (1.6e-7 apart) from the right one


@dataclass
class Evidence:
    """What a recogniser looks at: the case, the port's outputs and the failing checks."""

    case: Case
    actual: Mapping[str, Any]
    failures: list[CheckFailure]

    def failed(self, quantity: str) -> list[CheckFailure]:
        """The failing checks of `quantity`, in the case's order."""
        return [f for f in self.failures if f.check.quantity == quantity]

    def tensor(self, key: str) -> np.ndarray | None:
        """The port's value for `key` as float64, None when absent or not numeric."""
        value = self.actual.get(key)
        try:
            return None if value is None else np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return None

    def value(self, key: str) -> Any:
        """The port's exact value for `key`, or the expected one when the port wrote none."""
        return self.actual.get(key, self.case.expected.get(key))

    def agrees(self, actual: np.ndarray | None, candidate: np.ndarray, tolerance: float | None = None) -> bool:
        """Normwise agreement within `tolerance` (default: AGREES of the case's dtype)."""
        if actual is None or actual.size != candidate.size:
            return False
        a, c = actual.reshape(candidate.shape), candidate
        scale = max(float(np.max(np.abs(c))), 1e-300) if c.size else 1.0
        largest = float(np.max(np.abs(a - c), initial=0.0))
        limit = AGREES[self.case.dtype] if tolerance is None else tolerance
        return bool(np.all(np.isfinite(a))) and largest <= limit * scale


# --- the schedule of a case ------------------------------------------------------------------------


def _schedule(case: Case) -> dict[str, int] | None:
    """init_bgt, target_bgt, tinit, tfinal, total_step, deltaT of a schedule, allocator or trajectory case."""
    c = case.config
    keys = ("tinit", "tfinal", "total_step", "deltaT")
    if case.kind == "schedule":
        ranks = c["layer_ranks"]
        return {"init_bgt": sum(ranks), "target_bgt": c["target_r"] * len(ranks), **{k: c[k] for k in keys}}
    if case.kind == "allocator":
        layers = c["layers"]
        init_bgt = sum(r for _, r, _, _ in layers)
        return {"init_bgt": init_bgt, "target_bgt": c["target_r"] * len(layers), **{k: c[k] for k in keys}}
    if case.kind == "trajectory":
        a = c["adalora"]
        n = sum(1 for layer in c["layers"] if layer[3])
        return {"init_bgt": a["init_r"] * n, "target_bgt": a["target_r"] * n, **{k: a[k] for k in keys}}
    return None


def _final(s: Mapping[str, int]) -> int:
    """total_step - tfinal: the last masking step (forced), after which the rank pattern stays."""
    return s["total_step"] - s["tfinal"]


def _masking_steps(ev: Evidence) -> list[int]:
    """The steps <= total_step - tfinal at which the allocator masked (by the schedule, or forced at the end)."""
    s = _schedule(ev.case)
    if s is None:
        return []
    final = _final(s)
    return [step for step in range(1, final + 1) if step == final or budget_schedule(step, **s)[1]]


def _layers(case: Case) -> list[str]:
    """The adapted layers of a case, in its config's order (a trajectory's untargeted layers left out)."""
    if case.kind == "trajectory":
        return [layer[0] for layer in case.config["layers"] if layer[3]]
    return [layer[0] for layer in case.config.get("layers", [])]


def _pattern(ev: Evidence, step: int, *, golden: bool = False, own: bool = False) -> dict[str, list[bool]] | None:
    """The port's rank pattern at `step`, layer -> kept flags (the expected one where it wrote none);
    with `golden`, the expected one; with `own`, only what the port wrote (None where it wrote none)."""
    value = ev.case.expected.get if golden else ev.actual.get if own else ev.value
    if ev.case.kind == "trajectory":
        stored = value(f"step{step}.rank_pattern")
        return {k.removesuffix(".lora_E"): v for k, v in stored.items()} if isinstance(stored, Mapping) else None
    pattern = {name: value(f"step{step}.rank_pattern.{name}") for name in _layers(ev.case)}
    return pattern if all(isinstance(v, list) for v in pattern.values()) else None


def _kept(pattern: Mapping[str, list[bool]]) -> int:
    """How many rows a rank pattern keeps, over all its layers."""
    return sum(sum(bool(k) for k in keep) for keep in pattern.values())


def _E_nonzero(ev: Evidence, step: int, layer: str) -> list[bool] | None:
    """The port's flags E[i] != 0 after `step`."""
    if ev.case.kind == "trajectory":
        flags = ev.actual.get(f"step{step}.E_nonzero.{layer}")
        return [bool(f) for f in flags] if isinstance(flags, list) else None
    E = ev.tensor(f"step{step}.lora_E.{layer}")
    return None if E is None else [bool(v) for v in E.reshape(-1) != 0]


def _kept_but_pruned(ev: Evidence, step: int, pattern: Mapping[str, list[bool]]) -> bool:
    """True when, after `step`, some E row the pattern prunes is nonzero in the port's outputs."""
    for layer, keep in pattern.items():
        nonzero = _E_nonzero(ev, step, layer)
        if (
            nonzero is not None
            and len(nonzero) == len(keep)
            and any(n and not k for n, k in zip(nonzero, keep, strict=True))
        ):
            return True
    return False


def _previous(ev: Evidence, step: int, quantity: str, name: str | None, like: np.ndarray | None) -> np.ndarray | None:
    """The port's EMA `quantity` of `name` at the step before `step`: zeros before the case's first step."""
    key = f"step{step - 1}.{quantity}.{name}"
    if key not in ev.case.expected and not any(c.step is not None and c.step < step for c in ev.case.checks):
        return None if like is None else np.zeros_like(like)
    return ev.tensor(key)


def _unzeroed_masking_step(ev: Evidence) -> int | None:
    """The first masking step (<= total_step - tfinal) after which an E row the port's own pattern
    prunes is nonzero in its outputs, or None. Only a step at which the port's pattern is new (it
    masked there, by its own account) counts: a port that masks at other steps than peft's shows
    rows its older pattern pruned alive again, which says nothing of its zeroing."""
    previous = None
    for step in _masking_steps(ev):
        pattern, before = _pattern(ev, step, own=True), _pattern(ev, step - 1, own=True)
        if pattern is not None and pattern != before and pattern != previous and _kept_but_pruned(ev, step, pattern):
            return step
        previous = pattern
    return None


# --- the recognisers, in SPEC section 18's order -------------------------------------------------


def e_initialized_to_ones(ev: Evidence) -> bool:
    """E all ones: seen whole (init_lora_weights true: E must be all zeros), or as std 0 and mean 1."""
    E, std, mean = ev.tensor("lora_E"), ev.tensor("std.lora_E"), ev.tensor("mean.lora_E")
    if ev.failed("initial lora_E"):
        return E is not None and E.size > 0 and bool(np.all(E == 1))
    stats = ev.failed("std of initial lora_E") and std is not None and mean is not None
    return bool(stats) and bool(np.all(std == 0)) and bool(np.all(mean == 1))


def scaling_alpha_over_r(ev: Evidence) -> bool:
    """scaling = lora_alpha / r, the LoRA convention, where peft takes lora_alpha (float(r) when it is 0)."""
    c = ev.case.config
    scaling = ev.actual.get("scaling")
    if not ev.failed("scaling") or not isinstance(scaling, int | float) or c["r"] <= 0:
        return False  # lora_alpha 0 too: such a port gives 0 / r where peft takes float(r)
    return math.isclose(float(scaling), c["lora_alpha"] / c["r"], rel_tol=1e-9)


def conv_patches_taps_outer(ev: Evidence) -> bool:
    """y as a port computes it that orders patch columns (kh, kw, C): A's (and maybe the kernel's)
    columns meet the wrong pixels. Recomputed by the reference with those columns permuted."""
    if not ev.failed("output y"):
        return False
    weight = ev.case.inputs["weight"]
    out_c, c, kh, kw = weight.shape
    if c == 1 or kh * kw == 1:
        return False

    def taps_outer(m: np.ndarray) -> np.ndarray:  # column (i, j, c) read as (c, i, j)
        return m.reshape(m.shape[0], kh, kw, c).transpose(0, 3, 1, 2).reshape(m.shape[0], c * kh * kw)

    A = taps_outer(ev.case.inputs["lora_A"])
    W = taps_outer(weight.reshape(out_c, -1)).reshape(weight.shape)
    y = ev.tensor("y")
    for inputs in ({"lora_A": A}, {"lora_A": A, "weight": W}):  # a native base conv, or im2col for both
        wrong = dataclasses.replace(ev.case, inputs={**ev.case.inputs, **inputs})
        if ev.agrees(y, np.asarray(run_case(wrong, get_backend("numpy"))["y"])):
            return True
    return False


def orth_over_layers(ev: Evidence) -> bool:
    """R divided by the number of layers, not of matrices: twice peft's R (and gradients)."""
    if ev.case.kind == "orth":
        value = ev.tensor("value")
        expected = np.asarray(ev.case.expected["value"], dtype=np.float64)
        positive = float(expected.reshape(-1)[0]) > 0
        return bool(ev.failed("regularizer value")) and positive and ev.agrees(value, 2 * expected)
    first = ev.failures[0].check if ev.failures else None
    steps = [c.step for c in ev.case.checks if c.step is not None]
    if first is None or first.step != min(steps, default=None):  # a trajectory: off from its first step
        return False
    expected = np.asarray(ev.case.expected[first.key], dtype=np.float64)
    if first.quantity == ORTH_TERM:  # the term itself is checked
        return ev.agrees(ev.tensor(first.key), 2 * expected)
    if first.quantity != "loss":
        return False
    triplets = [SVDTriplet(*(ev.case.inputs[f"init.{n}.{part}"] for part in PARTS)) for n in _layers(ev.case)]
    R, _ = orthogonal_regularizer(triplets, ev.case.config["adalora"].get("orth_reg_weight", 0.5))
    loss = ev.tensor(first.key)  # the loss is off by exactly R of the initial triplets
    return float(R) > 0 and loss is not None and ev.agrees(loss - expected, np.full(expected.shape, float(R)))


def importance_from_E_alone(ev: Evidence) -> bool:
    """ipt of A and B missing or zero while E's is right."""
    failing = ev.failed("ipt")
    if not failing or any(f.check.layer is None or f.check.layer.endswith(".lora_E") for f in failing):
        return False
    for f in failing:
        ipt = ev.tensor(f.check.key)
        if not (f.missing or (ipt is not None and not np.any(ipt))):
            return False
    return any(c.quantity == "ipt" and c.layer and c.layer.endswith(".lora_E") for c in ev.case.checks)


def unc_against_previous(ev: Evidence) -> bool:
    """exp_avg_unc = beta2 * unc + (1 - beta2) * |ipt - exp_avg_ipt of the PREVIOUS step|, the port's own values."""
    failing = ev.failed("exp_avg_unc")
    if not failing:
        return False
    beta2 = ev.case.config["beta2"]
    first_step = failing[0].check.step
    for f in (f for f in failing if f.check.step == first_step):
        s, name = f.check.step, f.check.layer
        unc, ipt, avg = (ev.tensor(f"step{s}.{q}.{name}") for q in ("exp_avg_unc", "ipt", "exp_avg_ipt"))
        prev_avg, prev_unc = (_previous(ev, s, q, name, ipt) for q in ("exp_avg_ipt", "exp_avg_unc"))
        if unc is None or ipt is None or avg is None or prev_avg is None or prev_unc is None:
            return False
        wrong = beta2 * prev_unc + (1 - beta2) * np.abs(ipt - prev_avg)
        right = beta2 * prev_unc + (1 - beta2) * np.abs(ipt - avg)
        if not ev.agrees(unc, wrong) or ev.agrees(unc, right):
            return False
    return True


def score_as_sum(ev: Evidence) -> bool:
    """Triplet scores from exp_avg_ipt + exp_avg_unc (a sum), the port's own EMAs."""
    failing = ev.failed("triplet scores")
    if not failing:
        return False
    f = failing[0]
    s, name = f.check.step, f.check.layer
    last = max((t for t in range(s + 1) if f"step{t}.exp_avg_ipt.{name}.lora_A" in ev.case.expected), default=None)
    if last is None:
        return False
    parts = {}
    for part in PARTS:
        avg, unc = (ev.tensor(f"step{last}.{q}.{name}.{part}") for q in ("exp_avg_ipt", "exp_avg_unc"))
        if avg is None or unc is None:
            return False
        parts[part] = (avg, unc)

    def triplet_score(element: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        s_A, s_E, s_B = (element(*parts[p]) for p in PARTS)  # (r, in), (r, 1), (out, r)
        return s_E[:, 0] + (s_A.mean(axis=1) + s_B.mean(axis=0))  # (r,)

    scores = ev.tensor(f.check.key)
    return ev.agrees(scores, triplet_score(np.add)) and not ev.agrees(scores, triplet_score(np.multiply))


def linear_budget(ev: Evidence) -> bool:
    """Every failing budget lies within 1 of the linear interpolation from init_bgt to target_bgt."""
    failing, s = ev.failed("budget"), _schedule(ev.case)
    if not failing or s is None:
        return False
    span = _final(s) - s["tinit"]
    for f in failing:
        budget, step = ev.actual.get(f.check.key), f.check.step
        if not is_real(budget) or step is None:
            return False
        if not s["tinit"] < step <= _final(s):
            return False
        linear = s["init_bgt"] - (s["init_bgt"] - s["target_bgt"]) * (step - s["tinit"]) / span
        if abs(budget - linear) >= 1:
            return False
    return True


def keep_top_by_count(ev: Evidence) -> bool:
    """Exactly `budget` rows kept where peft's ties left fewer."""
    failing = ev.failed("rank pattern")
    if not failing or failing[0].check.step is None:
        return False
    step = failing[0].check.step
    pattern, expected = _pattern(ev, step), _pattern(ev, step, golden=True)
    budget, expected_budget = ev.value(f"step{step}.budget"), ev.case.expected.get(f"step{step}.budget")
    if pattern is None or expected is None or not isinstance(budget, int) or not isinstance(expected_budget, int):
        return False
    return _kept(pattern) == budget and _kept(expected) < expected_budget


def e_never_zeroed(ev: Evidence) -> bool:
    """At a masking step, E rows the port's own pattern prunes are still nonzero (and not because the
    port masks one step late: a port that counts from 0 zeroes its rows at the step after peft's)."""
    return any(ev.failed(q) for q in E_AFTER) and _unzeroed_masking_step(ev) is not None and not steps_from_0(ev)


def no_final_masking(ev: Evidence) -> bool:
    """E zeroed at every masking step, but past total_step - tfinal rows the stored pattern prunes come back."""
    s = _schedule(ev.case)
    if s is None or not any(ev.failed(q) for q in E_AFTER) or _unzeroed_masking_step(ev) is not None:
        return False
    if steps_from_0(ev):
        return False
    final = _final(s)
    pattern = _pattern(ev, final, own=True)
    later = sorted({f.check.step for f in ev.failures if f.check.step is not None and f.check.step > final})
    return pattern is not None and any(_kept_but_pruned(ev, step, pattern) for step in later)


def ranknum_follows_mask(ev: Evidence) -> bool:
    """ranknum equal to the number of rows kept (after masking, or after resizing on load)."""
    if ev.case.kind == "checkpoint":
        failing = ev.failed("ranknum after loading")
        return bool(failing) and all(ev.actual.get(f.check.key) == ev.value(f"r.{f.check.layer}") for f in failing)
    failing = ev.failed("ranknum")
    if not failing:
        return False
    for f in failing:
        nonzero = _E_nonzero(ev, f.check.step, f.check.layer) if f.check.step is not None else None
        pattern = _pattern(ev, f.check.step) if f.check.step is not None else None
        counts = {sum(nonzero)} if nonzero is not None else set()
        if pattern is not None and f.check.layer in pattern:
            counts.add(sum(pattern[f.check.layer]))
        if ev.actual.get(f.check.key) not in counts:
            return False
    return True


def float32_constants(ev: Evidence) -> bool:
    """A float64 case computed with constants rounded to float32 (beta1 = 0.85 -> 0.8500000238...).

    allocator: the first divergence is an EMA that the port's own previous EMA and ipt give exactly
    (to float64 rounding) with float32 betas. trajectory (AdamW's lr, betas, eps, weight_decay):
    recognised by size only: every failing check a tensor off by no more than float32 rounding
    carried through (ROUNDING), no decision (an exact check) changed.
    """
    if ev.case.dtype != "float64" or not ev.failures:
        return False
    if ev.case.kind == "trajectory":
        return all(f.error is not None and f.error <= ROUNDING for f in ev.failures)
    first = ev.failures[0].check
    if first.quantity not in ("exp_avg_ipt", "exp_avg_unc") or first.step is None:
        return False
    s, name, c = first.step, first.layer, ev.case.config
    ipt, avg, unc = (ev.tensor(f"step{s}.{q}.{name}") for q in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
    prev_avg, prev_unc = (_previous(ev, s, q, name, ipt) for q in ("exp_avg_ipt", "exp_avg_unc"))
    if ipt is None or prev_avg is None or prev_unc is None:
        return False
    b1, b2 = float(np.float32(c["beta1"])), float(np.float32(c["beta2"]))
    if first.quantity == "exp_avg_ipt":
        return ev.agrees(avg, b1 * prev_avg + (1 - b1) * ipt, EXACTLY)
    return avg is not None and ev.agrees(unc, b2 * prev_unc + (1 - b2) * np.abs(ipt - avg), EXACTLY)


def steps_from_0(ev: Evidence) -> bool:
    """The step passed to the schedule one less than peft's (a 0-based loop counter passed as is):
    some budget fails, and at every checked step s the port's budget is peft's schedule at s - 1."""
    s = _schedule(ev.case)
    if s is None or not ev.failed("budget"):
        return False
    checks = [c for c in ev.case.checks if c.quantity == "budget" and c.step is not None]
    for check in checks:
        budget = ev.value(check.key)
        if not is_integer(budget):
            return False
        if budget != budget_schedule(max(check.step - 1, 0), **s)[0]:
            return False
    return True


@dataclass(frozen=True)
class Mistake:
    name: str
    spec: str  # its subsection of docs/SPEC.md section 18
    kinds: tuple[str, ...]  # the case kinds it can show in
    causes: tuple[str, ...]  # the quantities it makes wrong itself, not through another one
    looks_like: Callable[[Evidence], bool]


MISTAKES = (
    Mistake(
        "E initialized to ones", "18.1", ("init",), ("initial lora_E", "std of initial lora_E"), e_initialized_to_ones
    ),
    Mistake("scaling = lora_alpha / r", "18.2", ("layer", "conv_layer"), ("scaling",), scaling_alpha_over_r),
    Mistake("conv patches ordered (kh, kw, C)", "18.3", ("conv_layer",), ("output y",), conv_patches_taps_outer),
    Mistake(
        "orthogonal term averaged over layers instead of matrices",
        "18.4",
        ("orth", "trajectory"),
        ("regularizer value", ORTH_TERM, "loss"),
        orth_over_layers,
    ),
    Mistake("importance from E alone", "18.5", ("allocator",), ("ipt",), importance_from_E_alone),
    Mistake("uncertainty against the previous average", "18.6", ("allocator",), ("exp_avg_unc",), unc_against_previous),
    Mistake("score = ipt + unc", "18.7", ("allocator",), ("triplet scores",), score_as_sum),
    Mistake("linear budget schedule", "18.8", ("schedule", "allocator", "trajectory"), ("budget",), linear_budget),
    Mistake(
        "keep the top budget rows by count", "18.9", ("allocator", "trajectory"), ("rank pattern",), keep_top_by_count
    ),
    Mistake("E never zeroed by masking", "18.10", ("allocator", "trajectory"), E_AFTER, e_never_zeroed),
    Mistake("no masking in the final phase", "18.11", ("allocator", "trajectory"), E_AFTER, no_final_masking),
    Mistake(
        "ranknum changed by masking",
        "18.12",
        ("trajectory", "checkpoint"),
        ("ranknum", "ranknum after loading"),
        ranknum_follows_mask,
    ),
    Mistake("float32-rounded constants in a float64 case", "18.13", ("allocator", "trajectory"), (), float32_constants),
    Mistake("steps counted from 0 (one step late)", "18.14", ("allocator", "trajectory"), ("budget",), steps_from_0),
)


def caused_by(found: list[KnownMistake]) -> set[str]:
    """The quantities that the mistakes `found` make wrong themselves (roots, whatever came before)."""
    names = {m.name for m in found}
    return {q for mistake in MISTAKES if mistake.name in names for q in mistake.causes}


def recognise(case: Case, actual: Mapping[str, Any], failures: list[CheckFailure]) -> list[KnownMistake]:
    """The known mistakes that `failures` (of `case`, with the port's `actual` outputs) look like."""
    if not failures:
        return []
    ev = Evidence(case, actual, failures)
    found = []
    for mistake in MISTAKES:
        if case.kind not in mistake.kinds:
            continue
        try:
            matched = mistake.looks_like(ev)
        except (KeyError, TypeError, ValueError, IndexError):  # outputs too malformed to tell: no match
            matched = False
        if matched:
            found.append(KnownMistake(mistake.name, mistake.spec))
    return found
