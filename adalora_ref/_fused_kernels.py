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
compute in float64), and no fastmath (no reassociation, no fused multiply-add).

The sums of the element scores run in another order than NumPy's BLAS call, as any reduction may, and
are more exact: float32 scores are summed in float64, reassociated by the compiler into vector lanes
(fastmath's `reassoc` alone, on the sums alone: each element score is still the product rounded in
float32), which leaves a float32 mean within an ulp of the exact one; float64 scores are summed with
the rounding error of every addition carried along (TwoSum, no fastmath), in lanes of fixed width.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

Array = np.ndarray


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


LANES = 8
"""Partial sums per row of a float64 lora_A: j = 0, 8, 16, ... go to lane 0, j = 1, 9, ... to lane 1,
so that the additions of one row need not wait for each other."""


@njit(fastmath={"reassoc"}, cache=True)
def wide_row_sums(avg: Array, unc: Array, out: Array) -> None:
    """out[i] = sum_j avg[i, j] * unc[i, j], each product rounded in the arrays' dtype, summed in float64."""
    for i in range(avg.shape[0]):
        a, u = avg[i], unc[i]
        total = 0.0
        for j in range(a.size):
            total += np.float64(a[j] * u[j])
        out[i] = total


@njit(fastmath={"reassoc"}, cache=True)
def wide_column_sums(avg: Array, unc: Array, out: Array) -> None:
    """out[c] = sum_k avg[k, c] * unc[k, c], each product rounded in the arrays' dtype, summed in float64."""
    totals = np.zeros(avg.shape[1])
    for k in range(avg.shape[0]):
        a, u = avg[k], unc[k]
        for c in range(a.size):
            totals[c] += np.float64(a[c] * u[c])
    out[:] = totals


@njit(fastmath=False, cache=True, inline="always")
def _two_sum(sums: Array, errors: Array, k: int, value: float) -> None:
    """sums[k] += value, and errors[k] += what that addition rounded off, exactly (Knuth's TwoSum)."""
    total = sums[k] + value
    back = total - sums[k]
    errors[k] += (sums[k] - (total - back)) + (value - back)
    sums[k] = total


@njit(fastmath=False, cache=True)
def compensated_row_sums(avg: Array, unc: Array, out: Array) -> None:
    """out[i] = sum_j avg[i, j] * unc[i, j] (float64), the rounding errors of the additions added back."""
    rows, n = avg.shape
    full = n - n % LANES
    lanes, errors = np.zeros(LANES), np.zeros(LANES)
    total, error = np.zeros(1), np.zeros(1)
    for i in range(rows):
        a, u = avg[i], unc[i]
        lanes[:], errors[:] = 0.0, 0.0
        for j0 in range(0, full, LANES):
            for lane in range(LANES):
                _two_sum(lanes, errors, lane, a[j0 + lane] * u[j0 + lane])
        total[0], error[0] = 0.0, errors.sum()
        for lane in range(LANES):
            _two_sum(total, error, 0, lanes[lane])
        for j in range(full, n):
            _two_sum(total, error, 0, a[j] * u[j])
        out[i] = total[0] + error[0]


@njit(fastmath=False, cache=True)
def compensated_column_sums(avg: Array, unc: Array, out: Array) -> None:
    """out[c] = sum_k avg[k, c] * unc[k, c] (float64), the rounding errors of the additions added back."""
    errors = np.zeros(avg.shape[1])
    out[:] = 0.0
    for k in range(avg.shape[0]):
        a, u = avg[k], unc[k]
        for c in range(a.size):
            _two_sum(out, errors, c, a[c] * u[c])
    out += errors


@njit(fastmath=False, cache=True)
def scores_from_averages(
    avg_A: Array, unc_A: Array, avg_E: Array, unc_E: Array, avg_B: Array, unc_B: Array, score: Array
) -> bool:
    """score[i] = s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i]) in the arrays' dtype; True when all finite."""
    r = score.size
    sum_A, sum_E, sum_B = np.empty(r), np.empty(r), np.empty(r)  # float64
    if score.itemsize == 8:
        compensated_row_sums(avg_A, unc_A, sum_A)
        compensated_row_sums(avg_E, unc_E, sum_E)  # one element a row: the element score itself, exactly
        compensated_column_sums(avg_B, unc_B, sum_B)
    else:
        wide_row_sums(avg_A, unc_A, sum_A)
        wide_row_sums(avg_E, unc_E, sum_E)
        wide_column_sums(avg_B, unc_B, sum_B)
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
