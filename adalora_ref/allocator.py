"""The rank allocator of AdaLoRA (peft's `RankAllocator`): importance, budget schedule, masking.

Arrays in, arrays out. The allocator never touches a model: it takes the triplets and their
gradients by layer name, keeps the importance state, and returns the budget, the threshold, the
masked singular values and the rank pattern. model.py applies them.

Quantities, for every element of every lora_A, lora_E and lora_B of the trained adapter:

    ipt         = |p * grad|                                        sensitivity
    exp_avg_ipt = beta1 * exp_avg_ipt + (1 - beta1) * ipt           smoothed sensitivity (starts at 0)
    exp_avg_unc = beta2 * exp_avg_unc + (1 - beta2) * |ipt - exp_avg_ipt|
                  (with the exp_avg_ipt just updated)               uncertainty (starts at 0)
    s           = exp_avg_ipt * exp_avg_unc                         element score (a product)

and for row i of a triplet (one singular value):

    score[i] = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i])

Budget (total rank over all triplets), `budget_schedule`: init_bgt while step <= tinit; target_bgt
once step > total_step - tfinal; in between int((init_bgt - target_bgt) * mul**3 + target_bgt)
with mul = 1 - (step - tinit) / (total_step - tfinal - tinit), masking when step % deltaT == 0.

Masking, `mask_to_budget`: threshold = the k-th smallest score over all triplets, k = init_bgt -
budget; every row with score <= threshold has its E set to 0 (so ties can prune more than k rows);
rank_pattern[layer] = [score > threshold]. A and B are never masked.

Decisions peft leaves undefined, made here (see docs/SPEC.md):
- k <= 0 (e.g. init_r == target_r): nothing is pruned and the threshold is -inf. peft crashes in
  torch.kthvalue ("k out of range", peft issue 2337).
- NaN or Inf in a parameter, a gradient or the importance: ValueError naming the layer and the
  tensor, and the state is left as it was. peft carries NaN into the scores silently: a row scored
  NaN is never pruned (NaN <= threshold is false) and is reported kept, and when every score is
  NaN nothing is pruned at all (checked with peft 0.21.2).
- A layer missing from, or extra in, the gradients, or a tensor of the wrong shape or dtype: ValueError
  (TypeError for a dtype); a triplet whose A has no columns or B no rows (peft's mean over no
  entries is NaN): ValueError.
- A step number smaller than the previous one: ValueError. A step that is not an int >= 0 (2.0,
  "3", True, -1): TypeError or ValueError naming global_step; step 0 is a valid step.
- Scores that overflow (finite importances whose product is not finite in the dtype): ValueError at
  the masking step, naming the layer (peft would prune every row, all scores tying at inf); the step
  leaves no trace (update_ipt, `masking_follows`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._backend import (
    Array,
    check_dtype,
    check_shape,
    check_step,
    device_of,
    dtype_name_or_raise,
    namespace,
    to_bool_list,
)
from .layer import SVDTriplet, TripletGrads

PARTS = ("lora_A", "lora_E", "lora_B")


def budget_schedule(
    step: int, *, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int, deltaT: int
) -> tuple[int, bool]:
    """(budget, mask_ind) at `step` (an int >= 0): peft's cubic schedule, truncated with int()."""
    step = check_step("step", step)
    if step <= tinit:  # initial warm-up: full budget, no masking
        return init_bgt, False
    if step > total_step - tfinal:  # final fine-tuning: target budget, always masked
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt)
    return budget, step % deltaT == 0


@dataclass
class ImportanceState:
    """The importance of one tensor (lora_A, lora_E or lora_B of one layer), shaped like it."""

    ipt: Array
    exp_avg_ipt: Array
    exp_avg_unc: Array

    @classmethod
    def zeros_like(cls, p: Array) -> ImportanceState:
        """The state before the first step: three separate arrays of zeros (they are updated in place)."""
        xp = namespace(p)
        return cls(xp.zeros_like(p), xp.zeros_like(p), xp.zeros_like(p))


def sensitivity(p: Array, grad: Array) -> Array:
    """ipt = |p * grad|, a new array. `abs()` is the array API's `__abs__`: no namespace lookup."""
    return abs(p * grad)


def update_importance(state: ImportanceState, ipt: Array, beta1: float, beta2: float) -> None:
    """One EMA step of sensitivity and uncertainty, written into `state`'s own arrays.

    In place, in peft's order of operations (`mul_(beta1).add_(ipt, alpha=1 - beta1)` rounds as
    `a *= beta1; a += (1 - beta1) * ipt`): at the paper's scale a step makes 8 MB of new arrays
    instead of 24. The arrays belong to the allocator; whoever keeps one across steps must copy it.
    """
    state.ipt = ipt
    state.exp_avg_ipt *= beta1
    state.exp_avg_ipt += (1 - beta1) * ipt
    deviation = abs(ipt - state.exp_avg_ipt)  # against the average just updated, as peft
    deviation *= 1 - beta2
    state.exp_avg_unc *= beta2
    state.exp_avg_unc += deviation


def element_score(state: ImportanceState) -> Array:
    return state.exp_avg_ipt * state.exp_avg_unc


def triplet_score(states: Mapping[str, ImportanceState]) -> Array:
    """score[i] = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i]), shape (r,)."""
    s_A = element_score(states["lora_A"])  # (r, in)
    s_E = element_score(states["lora_E"])  # (r, 1)
    s_B = element_score(states["lora_B"])  # (out, r)
    xp = namespace(s_A, s_E, s_B)
    # Both means as products with a vector of ones: one BLAS call each, where NumPy's reductions
    # run 1.5x (along A's rows) to 10x (down B's tall columns) slower. Summed in another order
    # than torch's mean, as any reduction here is (the scores agree to rounding).
    ones_in = xp.ones((s_A.shape[1],), dtype=s_A.dtype, device=device_of(s_A))
    ones_out = xp.ones((s_B.shape[0],), dtype=s_B.dtype, device=device_of(s_B))
    mean_A = (s_A @ ones_in) / s_A.shape[1]  # (r,)
    mean_B = (ones_out @ s_B) / s_B.shape[0]  # (r,)
    return s_E[:, 0] + (mean_A + mean_B)


def kth_smallest(values: Array, k: int) -> float:
    """The k-th smallest value (1-based), as torch.kthvalue; -inf when k <= 0 (nothing to prune)."""
    if k <= 0:
        return -math.inf
    xp = namespace(values)
    if k > values.shape[0]:
        raise ValueError(f"cannot prune {k} rows: only {values.shape[0]} singular values in all triplets")
    return float(xp.sort(values)[k - 1])


@dataclass
class Allocation:
    """What one call of `RankAllocator.update_and_allocate` decided."""

    budget: int
    masked: bool
    threshold: float | None = None  # None when no masking happened; -inf when nothing was pruned
    scores: dict[str, Array] = field(default_factory=dict)  # layer -> (r,) triplet scores, when masked
    lora_E: dict[str, Array] = field(default_factory=dict)  # layer -> masked E (r, 1), when masked
    rank_pattern: dict[str, list[bool]] | None = None  # layer -> keep flags, when masked


class RankAllocator:
    """Importance state of every triplet of the trained adapter, and the budgeted masking.

    `layers` maps each adapted layer's name to its rank r, in the order the model lists its
    layers. init_bgt = sum of r; target_bgt = target_r * number of layers (as peft).

    `state[layer][part]` holds the allocator's own arrays, updated in place every step (a new
    `ipt` array each step, the two averages in place): copy an array to keep its value.
    """

    def __init__(
        self,
        layers: Mapping[str, int],
        *,
        target_r: int,
        tinit: int,
        tfinal: int,
        total_step: int,
        deltaT: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 < beta < 1:
                raise ValueError(f"{name} must satisfy 0 < {name} < 1, got {beta}")
        self.layer_ranks = dict(layers)
        self.beta1, self.beta2 = beta1, beta2
        self.tinit, self.tfinal, self.total_step, self.deltaT = tinit, tfinal, total_step, deltaT
        self.init_bgt = sum(self.layer_ranks.values())
        self.target_bgt = target_r * len(self.layer_ranks)
        self.state: dict[str, dict[str, ImportanceState]] = {}
        self.average_bound = 0.0  # >= every element of both averages: each is an average of ipt values
        self.last_step: int | None = None

    @classmethod
    def from_config(cls, config, layers: Mapping[str, int]) -> RankAllocator:
        return cls(
            layers,
            target_r=config.target_r,
            tinit=config.tinit,
            tfinal=config.tfinal,
            total_step=config.total_step,
            deltaT=config.deltaT,
            beta1=config.beta1,
            beta2=config.beta2,
        )

    def reset_ipt(self) -> None:
        """Forget all importance (peft does this after the final masking)."""
        self.state = {}
        self.average_bound = 0.0

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        return budget_schedule(
            step,
            init_bgt=self.init_bgt,
            target_bgt=self.target_bgt,
            tinit=self.tinit,
            tfinal=self.tfinal,
            total_step=self.total_step,
            deltaT=self.deltaT,
        )

    def _check_inputs(self, params: Mapping[str, SVDTriplet], grads: Mapping[str, TripletGrads] | None) -> None:
        expected = set(self.layer_ranks)
        for what, given in (("params", params), ("grads", grads)):
            if given is None:
                continue
            missing, extra = sorted(expected - set(given)), sorted(set(given) - expected)
            if missing or extra:
                raise ValueError(f"{what} do not match the allocator's layers: missing {missing}, extra {extra}")
        float_dtypes: list[object] = []  # each dtype met in this call, once found to be float32 / float64
        for name, r in self.layer_ranks.items():
            triplet = params[name]
            if not isinstance(triplet, SVDTriplet):
                raise ValueError(f"params[{name!r}] must be an SVDTriplet, got {type(triplet).__name__}")
            if triplet.lora_A.dtype not in float_dtypes:
                dtype_name_or_raise(f"{name}.lora_A", triplet.lora_A)
                float_dtypes.append(triplet.lora_A.dtype)
            _check_triplet(name, triplet, r)
            if grads is None:
                continue
            if not isinstance(grads[name], TripletGrads):
                raise ValueError(f"grads[{name!r}] must be a TripletGrads, got {type(grads[name]).__name__}")
            for part in PARTS:
                p, g = getattr(triplet, part), getattr(grads[name], part)
                check_shape(f"{name}.{part} grad", g, tuple(p.shape))
                check_dtype(f"{name}.{part} grad", g, p.dtype)

    def update_ipt(
        self, params: Mapping[str, SVDTriplet], grads: Mapping[str, TripletGrads], *, masking_follows: bool = False
    ) -> None:
        """One importance step for every tensor. All-or-nothing: on an error the state is unchanged.

        Every sensitivity is computed and checked before any average moves: the averages are
        convex combinations of finite values, so once every ipt is finite they stay finite. Their
        scores can still overflow (products of two averages), and masking then refuses the step;
        when `masking_follows` and the averages are large enough for that, they move on copies, so
        that update_and_allocate can put the old ones back. Otherwise they move in place.
        """
        self._check_inputs(params, grads)
        ipts = {
            name: {part: sensitivity(getattr(params[name], part), getattr(grads[name], part)) for part in PARTS}
            for name in self.layer_ranks
        }
        bound = max(self.average_bound, _largest_finite(ipts, params, grads))
        if masking_follows and not _scores_fit(bound, ipts):
            self.state = _copied(self.state)
        for name, layer_ipts in ipts.items():
            layer_state = self.state.setdefault(name, {})
            for part, ipt in layer_ipts.items():
                if part not in layer_state:
                    layer_state[part] = ImportanceState.zeros_like(ipt)
                update_importance(layer_state[part], ipt, self.beta1, self.beta2)
        self.average_bound = bound

    def scores(self) -> dict[str, Array]:
        """layer -> (r,) triplet scores from the current importance state."""
        if not self.state:
            raise ValueError("no importance yet: update_ipt must run before masking")
        return {name: triplet_score(self.state[name]) for name in self.layer_ranks}

    def mask_to_budget(self, params: Mapping[str, SVDTriplet], budget: int) -> Allocation:
        """Zero the E rows whose score is <= the (init_bgt - budget)-th smallest score."""
        self._check_inputs(params, None)
        scores = self.scores()
        xp = namespace(*scores.values())
        all_scores = xp.concat(list(scores.values()))  # (init_bgt,) in layer order
        if not bool(xp.all(xp.isfinite(all_scores))):
            overflowing = [name for name, score in scores.items() if not bool(xp.all(xp.isfinite(score)))]
            raise ValueError(
                f"the importance scores of {overflowing} overflow (exp_avg_ipt * exp_avg_unc is not finite in "
                "this dtype): no threshold can be taken"
            )
        threshold = kth_smallest(all_scores, self.init_bgt - budget)
        keep_all = to_bool_list(all_scores > threshold)  # peft prunes score <= threshold: ties all go
        allocation = Allocation(budget=budget, masked=True, threshold=threshold, scores=scores, rank_pattern={})
        start = 0
        for name, score in scores.items():
            keep = score > threshold  # (r,)
            E = params[name].lora_E
            allocation.lora_E[name] = xp.where(keep[:, None], E, xp.zeros_like(E))
            allocation.rank_pattern[name] = keep_all[start : start + score.shape[0]]
            start += score.shape[0]
        return allocation

    def update_and_allocate(
        self,
        params: Mapping[str, SVDTriplet],
        grads: Mapping[str, TripletGrads] | None,
        global_step: int,
        force_mask: bool = False,
    ) -> Allocation:
        """peft's RankAllocator.update_and_allocate: importance (before total_step - tfinal), then
        the schedule, then masking when the schedule says so or `force_mask`. `global_step` is an
        int >= 0, not smaller than the previous call's."""
        global_step = check_step("global_step", global_step)
        if self.last_step is not None and global_step < self.last_step:
            raise ValueError(f"step {global_step} comes after step {self.last_step}: steps must not go backwards")
        budget, mask_ind = self.budget_schedule(global_step)
        masking = mask_ind or force_mask
        previous = self.state, self.average_bound
        try:
            if global_step < self.total_step - self.tfinal:
                if grads is None:
                    raise ValueError(f"step {global_step} updates the importance: gradients are required")
                self.update_ipt(params, grads, masking_follows=masking)
            allocation = self.mask_to_budget(params, budget) if masking else Allocation(budget, False)
        except BaseException:
            self.state, self.average_bound = previous  # all or nothing: a refused step leaves no trace
            raise
        self.last_step = global_step
        return allocation


def _scores_fit(bound: float, ipts: Mapping[str, Mapping[str, Array]]) -> bool:
    """Whether every triplet score is surely finite when no average exceeds `bound`.

    An element score is at most bound**2, a mean of a row or column sums at most `width` of them
    before dividing, and a triplet score adds three such terms: 3 * width * bound**2 must fit the dtype.
    """
    some = next(ipt for layer in ipts.values() for ipt in layer.values())
    width = max([1, *(max(ipt.shape) for layer in ipts.values() for ipt in layer.values())])
    return 3.0 * width * bound * bound <= float(namespace(some).finfo(some.dtype).max)


def _copied(state: dict[str, dict[str, ImportanceState]]) -> dict[str, dict[str, ImportanceState]]:
    """The importance state with both averages in new arrays (ipt is never updated in place)."""
    out: dict[str, dict[str, ImportanceState]] = {}
    for name, parts in state.items():
        out[name] = {}
        for part, s in parts.items():
            xp = namespace(s.exp_avg_ipt)
            out[name][part] = ImportanceState(
                s.ipt, xp.asarray(s.exp_avg_ipt, copy=True), xp.asarray(s.exp_avg_unc, copy=True)
            )
    return out


def _check_triplet(name: str, triplet: SVDTriplet, r: int) -> None:
    """A (r, in), E (r, 1), B (out, r), all of A's dtype, with in, out >= 1 when r > 0."""
    A, E, B = triplet.lora_A, triplet.lora_E, triplet.lora_B
    for part, x in zip(PARTS, (A, E, B), strict=True):
        check_dtype(f"{name}.{part}", x, A.dtype)
        if len(x.shape) != 2:
            raise ValueError(f"{name}.{part} must be 2-D, got shape {tuple(x.shape)}")
    if E.shape[0] != r:
        raise ValueError(f"{name}.lora_E has {E.shape[0]} rows, the allocator expects r = {r}")
    check_shape(f"{name}.lora_E", E, (r, 1))
    check_shape(f"{name}.lora_A", A, (r, A.shape[1]))
    check_shape(f"{name}.lora_B", B, (B.shape[0], r))
    if r > 0 and (A.shape[1] == 0 or B.shape[0] == 0):
        raise ValueError(
            f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} leave no entries to average: "
            "the importance of a layer with no inputs or no outputs is undefined"
        )


def mask_using_rank_pattern(
    params: Mapping[str, SVDTriplet], rank_pattern: Mapping[str, list[bool]]
) -> dict[str, Array]:
    """layer -> E with the rows the pattern does not keep set to 0 (peft's final phase)."""
    masked = {}
    for name, triplet in params.items():
        if name not in rank_pattern:
            raise ValueError(f"rank_pattern has no entry for layer {name!r}")
        keep = rank_pattern[name]
        if len(keep) != triplet.r:
            raise ValueError(f"rank_pattern[{name!r}] has {len(keep)} flags, the layer has r = {triplet.r}")
        xp = namespace(triplet.lora_E)
        E = triplet.lora_E
        keep_arr = xp.asarray(keep, dtype=xp.bool, device=device_of(E))
        masked[name] = xp.where(keep_arr[:, None], E, xp.zeros_like(E))
    return masked


def _largest_finite(
    ipts: Mapping[str, Mapping[str, Array]],
    params: Mapping[str, SVDTriplet],
    grads: Mapping[str, TripletGrads],
) -> float:
    """The largest sensitivity; raise when any is not finite, naming the tensor at fault.

    ipt = |p * grad| is finite only when p and grad are and their product does not overflow. The
    common case costs one max per tensor (max propagates NaN) and one transfer to the host; only a
    failure looks for the culprit tensor by tensor.
    """
    nonempty = [ipt for layer in ipts.values() for ipt in layer.values() if math.prod(ipt.shape)]
    if not nonempty:
        return 0.0
    xp = namespace(nonempty[0])
    largest = float(xp.max(xp.stack([xp.max(ipt) for ipt in nonempty])))
    if math.isfinite(largest):
        return largest
    for name, layer in ipts.items():
        for part, ipt in layer.items():
            if bool(xp.all(xp.isfinite(ipt))):
                continue
            p, g = getattr(params[name], part), getattr(grads[name], part)
            for what, x in ((f"{name}.{part}", p), (f"{name}.{part} gradient", g)):
                if not bool(xp.all(xp.isfinite(x))):
                    raise ValueError(f"{what} holds NaN or Inf: no importance score (peft keeps NaN rows silently)")
            raise ValueError(f"the importance of {name}.{part} overflows (|p * grad| is not finite in this dtype)")
