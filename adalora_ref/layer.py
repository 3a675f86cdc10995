"""The SVD-parameterized linear layer of AdaLoRA (peft's `SVDLinear`), forward and backward by hand.

One adapted linear layer computes

    y = base(x) + (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)

with A = lora_A (r, in) the right singular vectors, E = lora_E (r, 1) the singular values and
B = lora_B (out, r) the left singular vectors. `base(x)` is `x @ W.T + b`, or `x @ W + b` when
`fan_in_fan_out` (the weight is stored (in, out), as in GPT-2's Conv1D).

Two peft facts a port gets wrong (see docs/SPEC.md):
- `scaling` is `lora_alpha` itself (or `float(r)` when lora_alpha == 0), not `lora_alpha / r`;
  the division by the rank happens through `ranknum`.
- `ranknum` is the float initial rank. Masking E never changes it, so the scale of a layer is
  fixed for its whole life.

This module owns the layer's parameters, initialisation, forward, backward, delta weight and
merging. It does not own the allocator (allocator.py) or the orthogonal regularizer (orth.py).
The forward never forms the (out, in) delta matrix; only `delta_weight` (for merging) does.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ._backend import (
    Array,
    check_dtype,
    check_finite,
    check_shape,
    device_of,
    dtype_name_or_raise,
    from_numpy,
    namespace,
)

RANKNUM_EPS = 1e-5
"""peft adds this to ranknum before dividing: `scaling / (ranknum + 1e-5)`."""


def linear_forward(x2d: Array, weight: Array, bias: Array | None, fan_in_fan_out: bool = False) -> Array:
    """A plain (frozen) linear layer: (n, in) -> (n, out), y = x @ W.T + b, or x @ W + b with fan_in_fan_out."""
    xp = namespace(x2d, weight)
    W = weight if fan_in_fan_out else xp.matrix_transpose(weight)  # (in, out)
    y = x2d @ W
    return y if bias is None else y + bias


def linear_input_grad(grad_y2d: Array, weight: Array, fan_in_fan_out: bool = False) -> Array:
    """dL/dx (n, in) of a plain linear layer from dL/dy (n, out)."""
    xp = namespace(grad_y2d, weight)
    W = xp.matrix_transpose(weight) if fan_in_fan_out else weight  # (out, in)
    return grad_y2d @ W


@dataclass
class SVDTriplet:
    """The trainable parameters of one adapted layer: lora_A (r, in), lora_E (r, 1), lora_B (out, r)."""

    lora_A: Array
    lora_E: Array
    lora_B: Array

    @property
    def r(self) -> int:
        return int(self.lora_E.shape[0])


@dataclass
class TripletGrads:
    """Gradients of the loss with respect to one triplet, shaped like the triplet."""

    lora_A: Array
    lora_E: Array
    lora_B: Array


def init_triplet(
    rng: np.random.Generator,
    r: int,
    in_features: int,
    out_features: int,
    *,
    init_lora_weights: bool = True,
    xp: object | None = None,
    dtype: object | None = None,
    device: object | None = None,
) -> SVDTriplet:
    """A fresh triplet drawn from `rng`, as peft's `update_layer` initialises it.

    init_lora_weights=True (peft's default): E = 0, A ~ N(0, 0.02), B ~ N(0, 0.02), so the adapted
    layer starts equal to the base layer. init_lora_weights=False: A, E and B all standard normal.
    Draw order from `rng`: A, then E (only when not zero), then B. `xp` defaults to NumPy and
    `dtype` to float64.
    """
    if r < 0:
        raise ValueError(f"r must be >= 0 (r == 0 is allowed for AdaLoRA), got {r}")
    std = 0.02 if init_lora_weights else 1.0
    A = rng.normal(0.0, std, size=(r, in_features))
    E = np.zeros((r, 1)) if init_lora_weights else rng.normal(0.0, 1.0, size=(r, 1))
    B = rng.normal(0.0, std, size=(out_features, r))
    if xp is None:
        xp = namespace(np.zeros(0))
    if dtype is None:
        dtype = xp.float64
    return SVDTriplet(
        lora_A=from_numpy(xp, A, dtype=dtype, device=device),
        lora_E=from_numpy(xp, E, dtype=dtype, device=device),
        lora_B=from_numpy(xp, B, dtype=dtype, device=device),
    )


@dataclass
class ForwardCache:
    """What the backward pass needs from the forward pass of one SVDLinear call."""

    x_shape: tuple[int, ...]
    x2d: Array  # (n, in), the input with its leading dimensions flattened
    xd2d: Array | None  # (n, in), dropout(x); None when the adapter took no part
    u: Array | None  # (n, r), xd2d @ (A * E).T
    dropout_mask: Array | None  # (n, in) or None


class SVDLinear:
    """A frozen base linear layer plus one trainable AdaLoRA triplet.

    State: the base `weight` ((out, in), or (in, out) with fan_in_fan_out) and `bias` (out,) or
    None, the `triplet`, the constant `scaling` and `ranknum`, and the flags `merged` and
    `disable_adapters`. Math lives in `forward`, `backward` and `delta_weight`.
    """

    def __init__(
        self,
        weight: Array,
        bias: Array | None,
        triplet: SVDTriplet,
        *,
        lora_alpha: float,
        fan_in_fan_out: bool = False,
        ranknum: float | None = None,
        name: str = "layer",
    ) -> None:
        self.name = name
        xp = namespace(weight, bias, triplet.lora_A, triplet.lora_E, triplet.lora_B)
        dtype_name_or_raise(f"{name}.weight", weight)
        if len(weight.shape) != 2:
            raise ValueError(f"{name}.weight must be 2-D, got shape {tuple(weight.shape)}")
        if fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            out_features, in_features = weight.shape
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.fan_in_fan_out = fan_in_fan_out
        if bias is not None:
            check_shape(f"{name}.bias", bias, (self.out_features,))
            check_dtype(f"{name}.bias", bias, weight.dtype)
        r = triplet.r
        check_shape(f"{name}.lora_A", triplet.lora_A, (r, self.in_features))
        check_shape(f"{name}.lora_E", triplet.lora_E, (r, 1))
        check_shape(f"{name}.lora_B", triplet.lora_B, (self.out_features, r))
        for part in ("lora_A", "lora_E", "lora_B"):
            check_dtype(f"{name}.{part}", getattr(triplet, part), weight.dtype)
        self.weight = weight
        self.bias = bias
        self.triplet = triplet
        self.lora_alpha = lora_alpha
        # peft: scaling = lora_alpha if lora_alpha > 0 else float(r). Not lora_alpha / r.
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        # peft keeps ranknum as a one-element tensor of the parameters' dtype, equal to the initial r.
        # Masking never changes it; resizing copies the old value back (see model.resize_by_rank_pattern).
        initial = float(r) if ranknum is None else float(ranknum)
        self.ranknum = xp.asarray([initial], dtype=weight.dtype, device=device_of(weight))
        self.merged = False
        self.disable_adapters = False

    @property
    def r(self) -> int:
        return self.triplet.r

    def _lora_scale_denominator(self) -> Array:
        # In float32 this sum is rounded to float32, as in peft.
        return self.ranknum + RANKNUM_EPS

    def _check_input(self, x: Array, dropout_mask: Array | None) -> None:
        namespace(x, self.weight, dropout_mask)
        if len(x.shape) < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name}: input has shape {tuple(x.shape)}, its last dimension must be "
                f"in_features = {self.in_features}"
            )
        check_dtype(f"{self.name} input", x, self.weight.dtype)
        if dropout_mask is not None:
            check_shape(f"{self.name} dropout_mask", dropout_mask, tuple(x.shape))
            check_dtype(f"{self.name} dropout_mask", dropout_mask, self.weight.dtype)

    def forward(self, x: Array, dropout_mask: Array | None = None) -> tuple[Array, ForwardCache]:
        """y = base(x) + (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5).

        x: (..., in) with any number of leading dimensions (1-D included).
        dropout_mask: None (no dropout: evaluation, or lora_dropout == 0) or the array that torch's
        dropout multiplies x by, same shape as x: 0 where dropped, 1 / (1 - p) where kept.
        Returns y (..., out) and the cache for `backward`.

        As peft: with adapters disabled a merged layer is unmerged first, then only the base layer
        runs; a merged layer runs only the (merged) base layer.
        """
        self._check_input(x, dropout_mask)
        xp = namespace(x)
        if self.disable_adapters and self.merged:
            self.unmerge()
        x2d = xp.reshape(x, (-1, self.in_features))  # (n, in)
        y = linear_forward(x2d, self.weight, self.bias, self.fan_in_fan_out)  # (n, out)
        cache = ForwardCache(tuple(x.shape), x2d, None, None, None)
        if not (self.disable_adapters or self.merged):
            A, E, B = self.triplet.lora_A, self.triplet.lora_E, self.triplet.lora_B
            mask2d = None if dropout_mask is None else xp.reshape(dropout_mask, (-1, self.in_features))
            xd2d = x2d if mask2d is None else x2d * mask2d  # (n, in)
            u = xd2d @ xp.matrix_transpose(A * E)  # (n, r)
            v = u @ xp.matrix_transpose(B)  # (n, out)
            y = y + (v * self.scaling) / self._lora_scale_denominator()
            cache = ForwardCache(tuple(x.shape), x2d, xd2d, u, mask2d)
        out_shape = (*cache.x_shape[:-1], self.out_features)
        return xp.reshape(y, out_shape), cache

    def backward(self, cache: ForwardCache, grad_y: Array) -> tuple[Array, TripletGrads | None]:
        """From dL/dy (..., out): dL/dx (..., in) and the triplet's gradients.

        The chain rule, with s = scaling and d = ranknum + 1e-5, written in torch autograd's order:
            g_v  = (g / d) * s                  # (n, out)  through y = base + (v * s) / d
            g_B  = g_v.T @ u                    # (out, r)  through v = u @ B.T
            g_u  = g_v @ B                      # (n, r)
            g_AE = g_u.T @ xd                   # (r, in)   through u = xd @ (A * E).T
            g_A  = g_AE * E                     # (r, in)
            g_E  = sum_j g_AE[:, j] * A[:, j]   # (r, 1)
            g_x  = g @ W + (g_u @ (A * E)) * dropout_mask
        The triplet's gradients are None when the adapter took no part (merged or disabled), as
        torch leaves `.grad` None then.
        """
        xp = namespace(grad_y)
        out_shape = (*cache.x_shape[:-1], self.out_features)
        check_shape(f"{self.name} grad_y", grad_y, out_shape)
        check_dtype(f"{self.name} grad_y", grad_y, self.weight.dtype)
        g = xp.reshape(grad_y, (-1, self.out_features))  # (n, out)
        grad_x = linear_input_grad(g, self.weight, self.fan_in_fan_out)  # (n, in)
        grads = None
        if cache.u is not None and cache.xd2d is not None:
            A, E, B = self.triplet.lora_A, self.triplet.lora_E, self.triplet.lora_B
            g_v = (g / self._lora_scale_denominator()) * self.scaling  # (n, out)
            g_B = xp.matrix_transpose(g_v) @ cache.u  # (out, r)
            g_u = g_v @ B  # (n, r)
            g_AE = xp.matrix_transpose(g_u) @ cache.xd2d  # (r, in)
            g_A = g_AE * E  # (r, in)
            g_E = xp.sum(g_AE * A, axis=1, keepdims=True)  # (r, 1)
            g_xd = g_u @ (A * E)  # (n, in)
            grad_x = grad_x + (g_xd if cache.dropout_mask is None else g_xd * cache.dropout_mask)
            grads = TripletGrads(lora_A=g_A, lora_E=g_E, lora_B=g_B)
        return xp.reshape(grad_x, cache.x_shape), grads

    def delta_weight(self) -> Array:
        """B @ (A * E) * scaling / (ranknum + 1e-5), shaped as the base weight."""
        xp = namespace(self.weight)
        A, E, B = self.triplet.lora_A, self.triplet.lora_E, self.triplet.lora_B
        delta = B @ (A * E)  # (out, in)
        if self.fan_in_fan_out:
            delta = xp.matrix_transpose(delta)  # (in, out)
        return delta * self.scaling / self._lora_scale_denominator()

    def merge(self, safe_merge: bool = False) -> None:
        """Add the delta weight into the base weight.

        safe_merge=True computes the merged weight aside and raises ValueError, leaving the base
        weight untouched, when it holds NaN or Inf. Merging a merged layer does nothing (with a
        warning), as in peft.
        """
        if self.merged:
            warnings.warn(f"{self.name}: already merged, nothing to do", UserWarning, stacklevel=2)
            return
        merged = self.weight + self.delta_weight()
        if safe_merge:
            try:
                check_finite(f"{self.name}: merged weight", merged)
            except ValueError as err:
                raise ValueError(f"{err}; the adapter of {self.name} seems to be broken") from None
        self.weight = merged
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the delta weight from the base weight; warns and does nothing when not merged."""
        if not self.merged:
            warnings.warn(f"{self.name}: already unmerged, nothing to do", UserWarning, stacklevel=2)
            return
        self.weight = self.weight - self.delta_weight()
        self.merged = False
