"""The fused importance step: `FusedRankAllocator`, the rank allocator with its hot loop compiled.

allocator.py is the specification and the default; this module is an optional fast path for NumPy
arrays on the CPU, selected explicitly:

    from adalora_ref.fused import FusedRankAllocator      # pip install 'adalora-ref[fast]' (numba)
    allocator = FusedRankAllocator(layers, target_r=..., tinit=..., tfinal=..., total_step=...)

It is a RankAllocator (same arguments, `from_config`, budget schedule, masking, refusals) whose
importance step runs one compiled loop per triplet (_fused_kernels.triplet_step) instead of some
thirty NumPy calls, each a pass over memory: sensitivity, both averages and the triplet score read
p, grad and the averages once and write ipt and the averages once, the least memory a step can move.

What is the same as the readable path, and what is not:
- ipt, exp_avg_ipt and exp_avg_unc are bitwise equal (tests/test_fused.py): the same operations in
  the same order in the arrays' dtype, without fastmath. beta1 and beta2 enter as the dtype's values
  of the Python floats beta and 1 - beta, as NumPy rounds them against a float32 or float64 array
  (betas given as Python floats, as AdaLoraConfig keeps them: a NumPy float64 beta makes NumPy
  compute the readable path's float32 averages in float64, which this path does not copy).
- The triplet scores are sums in another order (as NumPy's BLAS call is): they agree to rounding,
  and are within a few ulps of the exact mean of the same element scores (1e-15 relative in float64).
- All or nothing, as update_ipt: the step writes the new averages into a second pair of arrays and
  the state switches to them only once every triplet is done and every ipt found finite. So nothing
  is ever written in place, no copy is needed before a masking step (`masking_follows` has nothing
  to do), and update_and_allocate puts the previous state back, when masking refuses, as it does for
  the readable path. The price: three more arrays per tensor, and `state` alternates between two
  sets of arrays (ipt and both averages; a fresh ipt array each step would cost its page faults
  every step): copy an array of the state to keep its value past the next step.
- update_and_allocate's masking does not check again the params its importance step checked a
  moment before (the readable path checks them twice).
- The triplet scores of a step come out of the same loop; `scores()` returns them while the state is
  the one they were computed from, and otherwise computes them from the state.
- NumPy arrays only: another library's arrays (array_api_strict, torch, cupy) are refused with
  FusedPathError, a TypeError. There is no GPU version.

Timings: bench/README.md, "The fused allocator step".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .allocator import PARTS, Allocation, ImportanceState, RankAllocator, _largest_finite, kth_smallest
from .layer import SVDTriplet, TripletGrads

Array = Any

INSTALL_HINT = "pip install 'adalora-ref[fast]' (numba >= 0.60)"


class FusedPathError(TypeError):
    """Arrays the fused step cannot take: not NumPy, or an importance state that is not the tensors' shape."""


def _kernels() -> Any:
    try:
        from . import _fused_kernels
    except ImportError as err:
        raise ImportError(f"FusedRankAllocator needs numba, which is not installed ({err}); {INSTALL_HINT}") from err
    return _fused_kernels


class _Plan:
    """The arrays one layer's importance alternates between: two sets, each an ImportanceState per
    part, and for each direction the kernel's arguments (the averages read, the arrays written)."""

    def __init__(self, first: dict[str, ImportanceState], shapes: list[tuple[tuple[int, ...], np.dtype]]) -> None:
        second = {
            part: ImportanceState(*(np.empty(*sd) for _ in range(3))) for part, sd in zip(PARTS, shapes, strict=True)
        }
        self.sets = (first, second)
        self.shapes = shapes
        self.args = tuple(  # args[i]: from set i to set 1 - i, per part (avg, unc, ipt', avg', unc')
            [
                (a.exp_avg_ipt, a.exp_avg_unc, b.ipt, b.exp_avg_ipt, b.exp_avg_unc)
                for a, b in ((now[part], then[part]) for part in PARTS)
            ]
            for now, then in ((first, second), (second, first))
        )

    def index(self, current: object) -> int | None:
        """Which set `current` (a layer's state) is, or None when it is neither."""
        return 0 if current is self.sets[0] else 1 if current is self.sets[1] else None


class FusedRankAllocator(RankAllocator):
    """RankAllocator whose importance step and scores run as one compiled loop per triplet (NumPy only)."""

    def __init__(self, layers: Mapping[str, int], **schedule: Any) -> None:
        """The arguments of RankAllocator. ImportError, with the install command, when numba is missing."""
        self._kernels = _kernels()  # refused up front, not at the first step
        super().__init__(layers, **schedule)
        self._plans: dict[str, _Plan] = {}  # layer -> the two sets of arrays its importance alternates between
        self._betas: dict[np.dtype, np.ndarray] = {}  # dtype -> [beta1, 1 - beta1, beta2, 1 - beta2]
        self._scored: tuple[object, dict[str, Array]] | None = None  # (a state, its triplet scores)
        self._in_step = False  # inside update_and_allocate (see _check_inputs)
        self._checked: Mapping[str, SVDTriplet] | None = None  # the params update_ipt checked in this step

    def reset_ipt(self) -> None:
        super().reset_ipt()
        self._plans, self._scored = {}, None

    def update_and_allocate(self, *args: Any, **kwargs: Any) -> Allocation:
        """RankAllocator.update_and_allocate (the same arguments); its masking does not check again
        the params that its importance step has just checked (nothing can change them in between)."""
        self._in_step, self._checked = True, None
        try:
            return super().update_and_allocate(*args, **kwargs)
        finally:
            self._in_step, self._checked = False, None

    def _check_inputs(self, params: Mapping[str, SVDTriplet], grads: Mapping[str, TripletGrads] | None) -> None:
        if grads is None and self._in_step and params is self._checked:
            return
        super()._check_inputs(params, grads)
        if grads is not None and self._in_step:
            self._checked = params

    def update_ipt(
        self, params: Mapping[str, SVDTriplet], grads: Mapping[str, TripletGrads], *, masking_follows: bool = False
    ) -> None:
        """One importance step for every tensor, all or nothing (see the module docstring).

        `masking_follows` is accepted for the readable path's signature: this step never changes the
        arrays of the state it starts from, so there is nothing to copy before a masking.
        """
        self._check_inputs(params, grads)
        new_state: dict[str, dict[str, ImportanceState]] = {}
        scores: dict[str, Array] = {}
        step = self._kernels.triplet_step
        for name, r in self.layer_ranks.items():
            t, g = params[name], grads[name]
            p_A, p_E, p_B = (_numpy(name, part, getattr(t, part)) for part in PARTS)
            g_A, g_E, g_B = (_numpy(name, part, getattr(g, part)) for part in PARTS)
            plan, now = self._plan(name, (p_A, p_E, p_B))
            (a_A, a_E, a_B), score = plan.args[now], np.empty(r, p_A.dtype)
            if not step(p_A, g_A, *a_A, p_E, g_E, *a_E, p_B, g_B, *a_B, self._betas_in(p_A.dtype), score):
                written = plan.sets[1 - now]
                _largest_finite({name: {part: written[part].ipt for part in PARTS}}, {name: t}, {name: g})  # raises
                # every ipt is finite: the score overflows, which masking refuses (as for the readable path)
            new_state[name], scores[name] = plan.sets[1 - now], score
        self.state = new_state
        self._scored = (new_state, scores)

    def scores(self) -> dict[str, Array]:
        """layer -> (r,) triplet scores: those of the last step's loop while the state is still its
        own, else computed from the state by the same sums."""
        if self._scored is not None and self._scored[0] is self.state:
            scores, self._scored = self._scored[1], None  # handed out once: the caller may keep them
            return scores
        if not self.state:
            raise ValueError("no importance yet: update_ipt must run before masking")
        out = {}
        for name, r in self.layer_ranks.items():
            states = self.state[name]
            arrays = []
            for part in PARTS:
                s = states[part]
                arrays += [_numpy(name, part, s.exp_avg_ipt), _numpy(name, part, s.exp_avg_unc)]
            out[name] = np.empty(r, arrays[0].dtype)
            self._kernels.scores_from_averages(*arrays, out[name])
        return out

    def mask_to_budget(self, params: Mapping[str, SVDTriplet], budget: int) -> Allocation:
        """RankAllocator.mask_to_budget on NumPy arrays, with the same threshold, flags and masked E."""
        self._check_inputs(params, None)
        scores = self.scores()
        all_scores = np.concatenate(list(scores.values()))  # (init_bgt,) in layer order
        if not np.isfinite(all_scores).all():
            return self._refuse_overflowing(scores)
        threshold = kth_smallest(all_scores, self.init_bgt - budget)
        keep_all = all_scores > threshold  # peft prunes score <= threshold: ties all go
        flags = keep_all.tolist()
        allocation = Allocation(budget=budget, masked=True, threshold=threshold, scores=scores, rank_pattern={})
        start = 0
        for name, score in scores.items():
            r = score.shape[0]
            E = params[name].lora_E
            allocation.lora_E[name] = np.where(keep_all[start : start + r, None], E, np.zeros_like(E))
            allocation.rank_pattern[name] = flags[start : start + r]
            start += r
        return allocation

    def _refuse_overflowing(self, scores: Mapping[str, np.ndarray]) -> Allocation:
        overflowing = [name for name, score in scores.items() if not np.isfinite(score).all()]
        raise ValueError(
            f"the importance scores of {overflowing} overflow (exp_avg_ipt * exp_avg_unc is not finite in "
            "this dtype): no threshold can be taken"
        )

    def _betas_in(self, dtype: np.dtype) -> np.ndarray:
        """[beta1, 1 - beta1, beta2, 1 - beta2] in `dtype`, each rounded from the Python float, as
        NumPy rounds `(1 - beta1) * ipt` against an array of that dtype."""
        betas = self._betas.get(dtype)
        if betas is None:
            beta1, beta2 = float(self.beta1), float(self.beta2)
            betas = self._betas[dtype] = np.array([beta1, 1 - beta1, beta2, 1 - beta2], dtype=dtype)
        return betas

    def _plan(self, name: str, tensors: tuple[np.ndarray, ...]) -> tuple[_Plan, int]:
        """The layer's plan and which of its sets the state holds now. A new plan when there is none
        (the first step), when the tensors' shapes or dtype changed, or when the state holds arrays
        this allocator did not make: their values are copied into the new plan's first set, so a
        user's arrays are never written."""
        shapes = [(x.shape, x.dtype) for x in tensors]
        current = self.state.get(name)
        plan = self._plans.get(name)
        if plan is not None and plan.shapes == shapes:
            now = plan.index(current)
            if now is not None:
                return plan, now
        if current is None:  # the state before the first step: zeros
            first = {
                part: ImportanceState(*(np.zeros(*sd) for _ in range(3)))
                for part, sd in zip(PARTS, shapes, strict=True)
            }
        else:
            first = {}
            for part, (shape, dtype) in zip(PARTS, shapes, strict=True):
                state = current[part]
                arrays = [_numpy(name, part, x) for x in (state.exp_avg_ipt, state.exp_avg_unc)]
                for what, x in zip(("exp_avg_ipt", "exp_avg_unc"), arrays, strict=True):
                    if x.shape != shape or x.dtype != dtype:
                        raise FusedPathError(
                            f"the {what} of {name}.{part} is {x.dtype} {x.shape}, the tensor {dtype} {shape}"
                        )
                first[part] = ImportanceState(np.zeros(shape, dtype), *(np.array(x, copy=True) for x in arrays))
        plan = self._plans[name] = _Plan(first, shapes)
        return plan, 0


def _new_set(shapes: list[tuple[tuple[int, ...], np.dtype]], make: Any) -> dict[str, ImportanceState]:
    """An ImportanceState per part, each array made by `make(shape, dtype)` (np.zeros, np.empty)."""
    return {part: ImportanceState(*(make(*sd) for _ in range(3))) for part, sd in zip(PARTS, shapes, strict=True)}


def _numpy(name: str, part: str, x: Array) -> np.ndarray:
    if type(x) is not np.ndarray and not isinstance(x, np.ndarray):
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        raise FusedPathError(
            f"{name}.{part} is a {kind}: the fused allocator step is NumPy-only (no GPU version); "
            "use RankAllocator, the readable path, for other array libraries"
        )
    return x
