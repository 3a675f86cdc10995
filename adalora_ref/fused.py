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

from .allocator import PARTS, ImportanceState, RankAllocator, _largest_finite
from .layer import SVDTriplet, TripletGrads

Array = Any
Pair = tuple[np.ndarray, np.ndarray]  # (exp_avg_ipt, exp_avg_unc) of one tensor

INSTALL_HINT = "pip install 'adalora-ref[fast]' (numba >= 0.60)"


class FusedPathError(TypeError):
    """Arrays the fused step cannot take: not NumPy, or an importance state that is not the tensors' shape."""


def _kernels() -> Any:
    try:
        from . import _fused_kernels
    except ImportError as err:
        raise ImportError(f"FusedRankAllocator needs numba, which is not installed ({err}); {INSTALL_HINT}") from err
    return _fused_kernels


class FusedRankAllocator(RankAllocator):
    """RankAllocator whose importance step and scores run as one compiled loop per triplet (NumPy only)."""

    def __init__(self, layers: Mapping[str, int], **schedule: Any) -> None:
        """The arguments of RankAllocator. ImportError, with the install command, when numba is missing."""
        self._kernels = _kernels()  # refused up front, not at the first step
        super().__init__(layers, **schedule)
        self._pairs: dict[tuple[str, str], tuple[Pair, Pair]] = {}  # the two pairs each tensor alternates between
        self._betas: dict[np.dtype, np.ndarray] = {}  # dtype -> [beta1, 1 - beta1, beta2, 1 - beta2]
        self._scored: tuple[object, dict[str, Array]] | None = None  # (a state, its triplet scores)
        self._ipts: dict[tuple[str, str], Pair] = {}  # the two ipt arrays each tensor alternates between
        self._in_step = False  # inside update_and_allocate (see _check_inputs)
        self._checked: Mapping[str, SVDTriplet] | None = None  # the params update_ipt checked in this step

    def reset_ipt(self) -> None:
        super().reset_ipt()
        self._pairs, self._ipts, self._scored = {}, {}, None

    def update_and_allocate(
        self,
        params: Mapping[str, SVDTriplet],
        grads: Mapping[str, TripletGrads] | None,
        global_step: int,
        force_mask: bool = False,
    ) -> Any:
        """RankAllocator.update_and_allocate; its masking does not check again the params that its
        importance step has just checked (nothing can change them in between)."""
        self._in_step, self._checked = True, None
        try:
            return super().update_and_allocate(params, grads, global_step, force_mask)
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
        for name, r in self.layer_ranks.items():
            triplet, triplet_grads, old = params[name], grads[name], self.state.get(name, {})
            args: list[Array] = []
            layer_state = new_state[name] = {}
            for part in PARTS:
                p, g = _numpy(name, part, getattr(triplet, part)), _numpy(name, part, getattr(triplet_grads, part))
                (avg, unc), (new_avg, new_unc) = self._pair_now_and_next(name, part, p, old.get(part))
                ipt = self._ipt_to_write(name, part, p, old.get(part))
                args += [p, g, avg, unc, ipt, new_avg, new_unc]
                layer_state[part] = ImportanceState(ipt, new_avg, new_unc)
            score = np.empty(r, p.dtype)
            if not self._kernels.triplet_step(*args, self._betas_in(p.dtype), score):
                ipts = {name: {part: s.ipt for part, s in layer_state.items()}}
                _largest_finite(ipts, {name: triplet}, {name: triplet_grads})  # raises, naming the tensor
                # every ipt is finite: the score overflows, which masking refuses (as for the readable path)
            scores[name] = score
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

    def _betas_in(self, dtype: np.dtype) -> np.ndarray:
        """[beta1, 1 - beta1, beta2, 1 - beta2] in `dtype`, each rounded from the Python float, as
        NumPy rounds `(1 - beta1) * ipt` against an array of that dtype."""
        if dtype not in self._betas:
            beta1, beta2 = float(self.beta1), float(self.beta2)
            self._betas[dtype] = np.array([beta1, 1 - beta1, beta2, 1 - beta2], dtype=dtype)
        return self._betas[dtype]

    def _ipt_to_write(self, name: str, part: str, p: np.ndarray, current: ImportanceState | None) -> np.ndarray:
        """The array this step writes the tensor's ipt into: of the two it alternates between, the one
        the state does not hold (a fresh array each step would cost its page faults every step)."""
        buffers = self._ipts.get((name, part))
        if buffers is None or buffers[0].shape != p.shape or buffers[0].dtype != p.dtype:
            buffers = self._ipts[(name, part)] = (np.empty(p.shape, p.dtype), np.empty(p.shape, p.dtype))
        return buffers[1] if current is not None and current.ipt is buffers[0] else buffers[0]

    def _pair_now_and_next(
        self, name: str, part: str, p: np.ndarray, current: ImportanceState | None
    ) -> tuple[Pair, Pair]:
        """((exp_avg_ipt, exp_avg_unc) of the state, the pair this step writes their new values into):
        of the two pairs the tensor alternates between, the one the state does not hold."""
        pairs = self._pairs.get((name, part))
        if current is not None and pairs is not None:
            now = (current.exp_avg_ipt, current.exp_avg_unc)
            for this, other in (pairs, pairs[::-1]):
                if now[0] is this[0] and now[1] is this[1] and this[0].shape == p.shape and this[0].dtype == p.dtype:
                    return this, other
        if current is None:  # the state before the first step
            now = (np.zeros(p.shape, p.dtype), np.zeros(p.shape, p.dtype))
        else:  # a state the allocator did not make: checked, as the loop trusts its shapes
            now = (_numpy(name, part, current.exp_avg_ipt), _numpy(name, part, current.exp_avg_unc))
            for what, x in zip(("exp_avg_ipt", "exp_avg_unc"), now, strict=True):
                if x.shape != p.shape or x.dtype != p.dtype:
                    raise FusedPathError(
                        f"the {what} of {name}.{part} is {x.dtype} {x.shape}, the tensor {p.dtype} {p.shape}"
                    )
        following = (np.empty(p.shape, p.dtype), np.empty(p.shape, p.dtype))
        self._pairs[(name, part)] = (now, following)
        return now, following


def _numpy(name: str, part: str, x: Array) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        raise FusedPathError(
            f"{name}.{part} is a {kind}: the fused allocator step is NumPy-only (no GPU version); "
            "use RankAllocator, the readable path, for other array libraries"
        )
    return x
