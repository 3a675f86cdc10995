"""The compiled loops of the fused allocator step (numba, CPU): adalora_ref/fused.py is their one caller.

`triplet_step` does for one triplet (lora_A, lora_E, lora_B of one layer) what allocator.update_ipt and
allocator.triplet_score do with some thirty NumPy calls, each a pass over memory: every element's

    ipt         = |p * grad|
    exp_avg_ipt = exp_avg_ipt * beta1 + (1 - beta1) * ipt
    exp_avg_unc = exp_avg_unc * beta2 + |ipt - exp_avg_ipt| * (1 - beta2)   (the average just updated)
    s           = exp_avg_ipt * exp_avg_unc

in one loop (p, grad and both averages read once, ipt and both new averages written once), then the
triplet score s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i]) from the new averages while they are in cache.

The averages are bitwise those of allocator.update_importance: the same operations in the same order,
in the arrays' dtype (the constants come in as an array of that dtype: a Python float would make numba
compute in float64), and no fastmath (no reassociation, no fused multiply-add). The sums of the scores
run in another order than NumPy's BLAS call, as any reduction may: in float64 accumulators, with the
rounding error of each addition carried along (TwoSum) when the arrays are float64, so that a mean is
within an ulp or so of the exact mean of the element scores.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

Array = np.ndarray

LANES = 8
"""Partial sums per row of lora_A: j = 0, 8, 16, ... go to lane 0, j = 1, 9, ... to lane 1, so that the
additions of one row do not wait for each other. A fixed number: the sums do not depend on the CPU."""


@njit(fastmath=False, cache=True)
def update_averages(
    p: Array, grad: Array, avg: Array, unc: Array, ipt: Array, new_avg: Array, new_unc: Array, betas: Array
) -> None:
    """ipt, exp_avg_ipt and exp_avg_unc of one tensor into `ipt`, `new_avg`, `new_unc` (C-contiguous).

    `betas` = [beta1, 1 - beta1, beta2, 1 - beta2] in the arrays' dtype, each computed as a Python
    float first, as NumPy rounds `(1 - beta1) * ipt`.
    """
    beta1, one_minus_beta1, beta2, one_minus_beta2 = betas[0], betas[1], betas[2], betas[3]
    p, grad, avg, unc = p.ravel(), grad.ravel(), avg.ravel(), unc.ravel()
    ipt, new_avg, new_unc = ipt.ravel(), new_avg.ravel(), new_unc.ravel()
    for k in range(p.size):
        x = abs(p[k] * grad[k])  # ipt = |p * grad|
        a = avg[k] * beta1 + one_minus_beta1 * x  # exp_avg_ipt *= beta1; exp_avg_ipt += (1 - beta1) * ipt
        ipt[k] = x
        new_avg[k] = a
        new_unc[k] = unc[k] * beta2 + abs(x - a) * one_minus_beta2  # deviation *= 1 - beta2; unc *= beta2; +=


@njit(fastmath=False, cache=True, inline="always")
def _add(sums: Array, errors: Array, k: int, value: float, compensated: bool) -> None:
    """sums[k] += value; with `compensated`, errors[k] collects what that addition rounded off (TwoSum)."""
    if compensated:
        total = sums[k] + value
        back = total - sums[k]
        errors[k] += (sums[k] - (total - back)) + (value - back)
        sums[k] = total
    else:
        sums[k] += value


@njit(fastmath=False, cache=True)
def row_sums(avg: Array, unc: Array, out: Array, compensated: bool) -> None:
    """out[i] = sum_j avg[i, j] * unc[i, j] (each product rounded in the arrays' dtype), in float64."""
    rows, n = avg.shape
    full = n - n % LANES
    lanes, errors = np.zeros((rows, LANES)), np.zeros((rows, LANES))
    for i in range(rows):
        a, u, lane, error = avg[i], unc[i], lanes[i], errors[i]
        for j0 in range(0, full, LANES):
            for lane_k in range(LANES):
                _add(lane, error, lane_k, np.float64(a[j0 + lane_k] * u[j0 + lane_k]), compensated)
    total, error = np.zeros(1), np.zeros(1)
    for i in range(rows):
        total[0], error[0] = 0.0, 0.0
        for lane_k in range(LANES):
            _add(total, error, 0, lanes[i, lane_k], compensated)
            error[0] += errors[i, lane_k]
        for j in range(full, n):
            _add(total, error, 0, np.float64(avg[i, j] * unc[i, j]), compensated)
        out[i] = total[0] + error[0]


@njit(fastmath=False, cache=True)
def column_sums(avg: Array, unc: Array, out: Array, compensated: bool) -> None:
    """out[c] = sum_k avg[k, c] * unc[k, c] (each product rounded in the arrays' dtype), in float64."""
    n, cols = avg.shape
    errors = np.zeros(cols)
    out[:] = 0.0
    for k in range(n):
        for c in range(cols):
            _add(out, errors, c, np.float64(avg[k, c] * unc[k, c]), compensated)
    for c in range(cols):
        out[c] += errors[c]


@njit(fastmath=False, cache=True)
def scores_from_averages(
    avg_A: Array, unc_A: Array, avg_E: Array, unc_E: Array, avg_B: Array, unc_B: Array, score: Array
) -> bool:
    """score[i] = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i]) in the arrays' dtype; True when all finite."""
    r = score.size
    compensated = score.itemsize == 8  # float64: carry the rounding errors; float32: float64 sums suffice
    sum_A, sum_E, sum_B = np.empty(r), np.empty(r), np.empty(r)
    row_sums(avg_A, unc_A, sum_A, compensated)
    row_sums(avg_E, unc_E, sum_E, compensated)  # one element a row: the element score itself, exactly
    column_sums(avg_B, unc_B, sum_B, compensated)
    mean_A, mean_B, widths = np.empty_like(score), np.empty_like(score), np.empty(2, score.dtype)
    widths[0], widths[1] = avg_A.shape[1], avg_B.shape[0]
    finite = True
    for i in range(r):
        mean_A[i], mean_B[i], score[i] = sum_A[i], sum_B[i], sum_E[i]  # rounded to the dtype
        mean_A[i] = mean_A[i] / widths[0]
        mean_B[i] = mean_B[i] / widths[1]
        score[i] = score[i] + (mean_A[i] + mean_B[i])
        finite = finite and math.isfinite(score[i])
    return finite


@njit(fastmath=False, cache=True)
def triplet_step(
    p_A: Array, g_A: Array, avg_A: Array, unc_A: Array, ipt_A: Array, new_avg_A: Array, new_unc_A: Array,
    p_E: Array, g_E: Array, avg_E: Array, unc_E: Array, ipt_E: Array, new_avg_E: Array, new_unc_E: Array,
    p_B: Array, g_B: Array, avg_B: Array, unc_B: Array, ipt_B: Array, new_avg_B: Array, new_unc_B: Array,
    betas: Array, score: Array,
) -> bool:  # fmt: skip
    """One importance step of a triplet and its score (see the module docstring); True when the
    score is finite. A non-finite ipt makes its row's score NaN, so False is how the caller learns
    of NaN or Inf in p or grad as well as of an overflowing score."""
    update_averages(p_A, g_A, avg_A, unc_A, ipt_A, new_avg_A, new_unc_A, betas)
    update_averages(p_E, g_E, avg_E, unc_E, ipt_E, new_avg_E, new_unc_E, betas)
    update_averages(p_B, g_B, avg_B, unc_B, ipt_B, new_avg_B, new_unc_B, betas)
    return scores_from_averages(new_avg_A, new_unc_A, new_avg_E, new_unc_E, new_avg_B, new_unc_B, score)
