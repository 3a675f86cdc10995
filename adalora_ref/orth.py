"""The orthogonal regularizer of AdaLoRA and its gradient, in peft's form.

peft's `AdaLoraModel.forward` adds to the loss

    R = orth_reg_weight * (sum over every lora_A and lora_B of the trainable adapter of
                           ||A A^T - I||_F  or  ||B^T B - I||_F) / (number of matrices)

The norm is the plain Frobenius norm, NOT squared as the paper writes it. Matrices are visited in
the order of the triplets given, A before B. Layers with r = 0 still count in the number of
matrices (their norm is 0).

Gradient of one term, with M = A A^T - I (r, r):  dR/dA = c * (G @ A + G.T @ A), G = M / ||M||_F,
c = orth_reg_weight / n_matrices; for B with M = B^T B - I: dR/dB = c * (B @ G.T + B @ G).
Where ||M||_F == 0 the gradient is 0, as torch's autograd makes it (its norm backward masks the
division by a zero norm).

peft adds R only when the wrapped model's output has a `.loss` tensor; the lifecycle in model.py
decides when to call this module. This module owns only the math.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._backend import Array, device_of, namespace
from .layer import SVDTriplet


def _norm_and_unit(M: Array) -> tuple[Array, Array]:
    """||M||_F and G = M / ||M||_F, with G = 0 where the norm is 0 (torch's convention)."""
    xp = namespace(M)
    norm = xp.sqrt(xp.sum(M * M))
    if float(norm) == 0.0:
        return norm, xp.zeros_like(M)
    return norm, M / norm


def orthogonal_regularizer(
    triplets: Sequence[SVDTriplet], orth_reg_weight: float
) -> tuple[Array, list[tuple[Array, Array]]]:
    """R and its gradients [(dR/dA, dR/dB) for each triplet], as peft computes R.

    Returns R as a 0-d array (0.0 when there are no triplets) and one (grad_A, grad_B) pair per
    triplet, shaped like (lora_A, lora_B). orth_reg_weight < 0 raises ValueError, as in peft.
    """
    if orth_reg_weight < 0:
        raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
    if not triplets:
        return 0.0, []
    xp = namespace(*(t.lora_A for t in triplets))
    n_matrices = 2 * len(triplets)
    coeff = orth_reg_weight / n_matrices
    total = None
    grads = []
    for t in triplets:
        A, B = t.lora_A, t.lora_B  # (r, in), (out, r)
        r = t.r
        eye = xp.eye(r, dtype=A.dtype, device=device_of(A))
        norm_A, G_A = _norm_and_unit(A @ xp.matrix_transpose(A) - eye)  # (r, r)
        norm_B, G_B = _norm_and_unit(xp.matrix_transpose(B) @ B - eye)  # (r, r)
        total = norm_A + norm_B if total is None else total + norm_A + norm_B
        grad_A = coeff * (G_A @ A + xp.matrix_transpose(G_A) @ A)  # (r, in)
        grad_B = coeff * (B @ xp.matrix_transpose(G_B) + B @ G_B)  # (out, r)
        grads.append((grad_A, grad_B))
    return orth_reg_weight * (total / n_matrices), grads
