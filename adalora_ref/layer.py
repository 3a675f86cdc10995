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

import math
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
    is_finite_real,
    namespace,
    plain_real,
    shown,
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


def check_base_linear(name: str, weight: Array, bias: Array | None, fan_in_fan_out: bool = False) -> tuple[int, int]:
    """(in_features, out_features) of a frozen linear layer, after refusing, naming the layer, a weight
    that is not a 2-D float array ((out, in), or (in, out) with fan_in_fan_out) or a bias that is not
    (out,) of the weight's dtype."""
    namespace(weight, bias)
    dtype_name_or_raise(f"{name}.weight", weight)
    if len(weight.shape) != 2:
        layout = "(in, out) with fan_in_fan_out" if fan_in_fan_out else "(out, in)"
        raise ValueError(f"{name}.weight must be 2-D {layout}, got shape {tuple(weight.shape)}")
    out_features, in_features = (int(n) for n in (weight.shape[::-1] if fan_in_fan_out else weight.shape))
    if bias is not None:
        check_shape(f"{name}.bias", bias, (out_features,))
        check_dtype(f"{name}.bias", bias, weight.dtype)
    return in_features, out_features


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
class LoraAdapter:
    """One AdaLoRA adapter on one layer: its triplet and its constant scale.

    scaling = lora_alpha if lora_alpha > 0 else float(r) (peft; NOT lora_alpha / r), and
    ranknum (a one-element array of the parameters' dtype) is the initial r: masking never changes it.
    """

    triplet: SVDTriplet
    lora_alpha: float
    scaling: float
    ranknum: Array  # (1,)

    def denominator(self) -> Array:
        """ranknum + 1e-5, in the parameters' dtype (so rounded to float32 in float32, as in peft)."""
        return self.ranknum + RANKNUM_EPS


@dataclass
class ForwardCache:
    """What the backward pass needs from the forward pass of one SVDLinear call."""

    x_shape: tuple[int, ...]
    x2d: Array  # (n, in), the input with its leading dimensions flattened
    xd2d: Array | None  # (n, in), dropout(x); None when no adapter took part
    u: dict[str, Array]  # adapter name -> (n, r), xd2d @ (A * E).T, for every adapter that took part
    dropout_mask: Array | None  # (n, in) or None


class SVDLinear:
    """A frozen base linear layer plus one or more AdaLoRA adapters (peft's SVDLinear).

    State: the base `weight` ((out, in), or (in, out) with fan_in_fan_out) and `bias` (out,) or
    None; `adapters` by name; `active_adapters` (the forward sums them); `trainable_adapter` (the
    one whose gradients `backward` returns); `merged_adapters`; the flag `disable_adapters`.
    `triplet`, `scaling`, `ranknum`, `lora_alpha` and `r` are those of the trainable adapter (or of
    the first adapter when none is trainable).
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
        adapter_name: str = "default",
    ) -> None:
        self.name = name
        self.in_features, self.out_features = check_base_linear(name, weight, bias, fan_in_fan_out)
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight
        self.bias = bias
        self.adapters: dict[str, LoraAdapter] = {}
        self.add_adapter(adapter_name, triplet, lora_alpha=lora_alpha, ranknum=ranknum)
        self.active_adapters = [adapter_name]
        self.trainable_adapter: str | None = adapter_name
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(
        self, adapter_name: str, triplet: SVDTriplet, *, lora_alpha: float, ranknum: float | None = None
    ) -> None:
        """Add (or replace) an adapter; it is not made active. ranknum defaults to the triplet's r.

        lora_alpha must be a finite int or float (not a bool): peft turns NaN into scaling = r (NaN > 0
        is false) and inf into infinite outputs; both are refused here. ranknum, when given, must be
        a finite number >= 0.
        """
        where = f"{self.name}[{adapter_name}]"
        if not isinstance(triplet, SVDTriplet):
            raise TypeError(f"{where}: the triplet must be an SVDTriplet, got {type(triplet).__name__}")
        if not is_finite_real(lora_alpha):
            raise ValueError(f"{where}.lora_alpha must be a finite number (int or float), got {shown(lora_alpha)}")
        # A plain int or float: a NumPy float64 scalar would promote a float32 layer's outputs to float64.
        lora_alpha = plain_real(lora_alpha)
        if ranknum is not None and not (is_finite_real(ranknum) and ranknum >= 0):
            raise ValueError(f"{where}.ranknum must be None or a finite number >= 0, got {shown(ranknum)}")
        namespace(self.weight, triplet.lora_A, triplet.lora_E, triplet.lora_B)
        if len(triplet.lora_E.shape) != 2:
            raise ValueError(f"{where}.lora_E must be 2-D (r, 1), got shape {tuple(triplet.lora_E.shape)}")
        r = triplet.r
        check_shape(f"{where}.lora_A", triplet.lora_A, (r, self.in_features))
        check_shape(f"{where}.lora_E", triplet.lora_E, (r, 1))
        check_shape(f"{where}.lora_B", triplet.lora_B, (self.out_features, r))
        for part in ("lora_A", "lora_E", "lora_B"):
            check_dtype(f"{where}.{part}", getattr(triplet, part), self.weight.dtype)
        xp = namespace(self.weight)
        initial = float(r) if ranknum is None else float(ranknum)
        self.adapters[adapter_name] = LoraAdapter(
            triplet=triplet,
            lora_alpha=lora_alpha,
            # peft: scaling = lora_alpha if lora_alpha > 0 else float(r). Not lora_alpha / r.
            scaling=lora_alpha if lora_alpha > 0 else float(r),
            # peft keeps ranknum as a one-element tensor of the parameters' dtype, equal to the initial r.
            ranknum=xp.asarray([initial], dtype=self.weight.dtype, device=device_of(self.weight)),
        )

    def _main(self) -> LoraAdapter:
        """The trainable adapter, or the first adapter when none is trainable (an inference model)."""
        if self.trainable_adapter in self.adapters:
            return self.adapters[self.trainable_adapter]
        return next(iter(self.adapters.values()))

    @property
    def triplet(self) -> SVDTriplet:
        return self._main().triplet

    @triplet.setter
    def triplet(self, triplet: SVDTriplet) -> None:
        main = self._main()
        before = main.triplet
        for part in ("lora_A", "lora_E", "lora_B"):
            check_shape(f"{self.name}.{part}", getattr(triplet, part), tuple(getattr(before, part).shape))
            check_dtype(f"{self.name}.{part}", getattr(triplet, part), self.weight.dtype)
        main.triplet = triplet

    @property
    def scaling(self) -> float:
        return self._main().scaling

    @property
    def ranknum(self) -> Array:
        return self._main().ranknum

    @property
    def lora_alpha(self) -> float:
        return self._main().lora_alpha

    @property
    def r(self) -> int:
        return self.triplet.r

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- forward and backward -----------------------------------------------------------------

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
        """y = base(x) + sum over active adapters of (dropout(x) @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5).

        x: (..., in) with any number of leading dimensions (1-D included).
        dropout_mask: None (no dropout: evaluation, or lora_dropout == 0) or the array that torch's
        dropout multiplies x by, same shape as x: 0 where dropped, 1 / (1 - p) where kept.
        Returns y (..., out) and the cache for `backward`.

        As peft: with adapters disabled a merged layer is unmerged first, then only the base layer
        runs; while any adapter is merged only the (merged) base layer runs, active adapters or not.
        """
        self._check_input(x, dropout_mask)
        xp = namespace(x)
        if self.disable_adapters and self.merged:
            self.unmerge()
        rows = math.prod(x.shape[:-1])  # n, spelled out: -1 is ambiguous when in_features == 0
        x2d = xp.reshape(x, (rows, self.in_features))  # (n, in)
        y = linear_forward(x2d, self.weight, self.bias, self.fan_in_fan_out)  # (n, out)
        cache = ForwardCache(tuple(x.shape), x2d, None, {}, None)
        if not (self.disable_adapters or self.merged):
            mask2d = None if dropout_mask is None else xp.reshape(dropout_mask, (rows, self.in_features))
            xd2d = x2d if mask2d is None else x2d * mask2d  # (n, in)
            cache = ForwardCache(tuple(x.shape), x2d, xd2d, {}, mask2d)
            for adapter_name in self.active_adapters:
                if adapter_name not in self.adapters:  # as peft: an active adapter this layer lacks is skipped
                    continue
                adapter = self.adapters[adapter_name]
                A, E, B = adapter.triplet.lora_A, adapter.triplet.lora_E, adapter.triplet.lora_B
                u = xd2d @ xp.matrix_transpose(A * E)  # (n, r)
                v = u @ xp.matrix_transpose(B)  # (n, out)
                y = y + (v * adapter.scaling) / adapter.denominator()
                cache.u[adapter_name] = u
        out_shape = (*cache.x_shape[:-1], self.out_features)
        return xp.reshape(y, out_shape), cache

    def backward(self, cache: ForwardCache, grad_y: Array) -> tuple[Array, TripletGrads | None]:
        """From dL/dy (..., out): dL/dx (..., in) and the trainable adapter's gradients.

        The chain rule for one adapter, with s = scaling and d = ranknum + 1e-5, in torch autograd's order:
            g_v  = (g / d) * s                  # (n, out)  through y = base + (v * s) / d
            g_B  = g_v.T @ u                    # (out, r)  through v = u @ B.T
            g_u  = g_v @ B                      # (n, r)
            g_AE = g_u.T @ xd                   # (r, in)   through u = xd @ (A * E).T
            g_A  = g_AE * E                     # (r, in)
            g_E  = sum_j g_AE[:, j] * A[:, j]   # (r, 1)
            g_x  = g @ W + (sum over adapters of g_u @ (A * E)) * dropout_mask
        The triplet's gradients are None when the trainable adapter took no part (not active, merged
        or disabled), as torch leaves `.grad` None then; inference adapters get none.
        """
        xp = namespace(grad_y)
        out_shape = (*cache.x_shape[:-1], self.out_features)
        check_shape(f"{self.name} grad_y", grad_y, out_shape)
        check_dtype(f"{self.name} grad_y", grad_y, self.weight.dtype)
        g = xp.reshape(grad_y, (math.prod(out_shape[:-1]), self.out_features))  # (n, out)
        grad_x = linear_input_grad(g, self.weight, self.fan_in_fan_out)  # (n, in)
        grads = None
        g_xd = None
        for adapter_name, u in cache.u.items():
            adapter = self.adapters[adapter_name]
            A, E, B = adapter.triplet.lora_A, adapter.triplet.lora_E, adapter.triplet.lora_B
            g_v = (g / adapter.denominator()) * adapter.scaling  # (n, out)
            g_u = g_v @ B  # (n, r)
            term = g_u @ (A * E)  # (n, in)
            g_xd = term if g_xd is None else g_xd + term
            if adapter_name == self.trainable_adapter:
                g_B = xp.matrix_transpose(g_v) @ u  # (out, r)
                g_AE = xp.matrix_transpose(g_u) @ cache.xd2d  # (r, in)
                g_A = g_AE * E  # (r, in)
                g_E = xp.sum(g_AE * A, axis=1, keepdims=True)  # (r, 1)
                grads = TripletGrads(lora_A=g_A, lora_E=g_E, lora_B=g_B)
        if g_xd is not None:
            grad_x = grad_x + (g_xd if cache.dropout_mask is None else g_xd * cache.dropout_mask)
        return xp.reshape(grad_x, cache.x_shape), grads

    # -- merging ------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str | None = None) -> Array:
        """B @ (A * E) * scaling / (ranknum + 1e-5), shaped as the base weight (default: trainable adapter)."""
        xp = namespace(self.weight)
        adapter = self._main() if adapter_name is None else self.adapters[adapter_name]
        A, E, B = adapter.triplet.lora_A, adapter.triplet.lora_E, adapter.triplet.lora_B
        delta = B @ (A * E)  # (out, in)
        if self.fan_in_fan_out:
            delta = xp.matrix_transpose(delta)  # (in, out)
        return delta * adapter.scaling / adapter.denominator()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the delta weights of `adapter_names` (default: the active adapters) into the base weight.

        safe_merge=True computes each merged weight aside and raises ValueError, leaving the base
        weight untouched, when it holds NaN or Inf. Already merged adapters are skipped with a
        warning, as in peft.
        """
        if adapter_names is None:
            adapter_names = [n for n in self.active_adapters if n in self.adapters]
        names = list(adapter_names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(f"{self.name}: no adapter named {unknown}; adapters are {list(self.adapters)}")
        already = [n for n in names if n in self.merged_adapters]
        if already:
            warnings.warn(f"{self.name}: already merged {already}, nothing to do for them", UserWarning, stacklevel=2)
        for adapter_name in (n for n in names if n not in self.merged_adapters):
            merged = self.weight + self.delta_weight(adapter_name)
            if safe_merge:
                try:
                    check_finite(f"{self.name}: merged weight", merged)
                except ValueError as err:
                    raise ValueError(f"{err}; the adapter {adapter_name} of {self.name} seems to be broken") from None
            self.weight = merged
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta weight, last merged first; warns when none is merged."""
        if not self.merged:
            warnings.warn(f"{self.name}: already unmerged, nothing to do", UserWarning, stacklevel=2)
            return
        while self.merged_adapters:
            self.weight = self.weight - self.delta_weight(self.merged_adapters.pop())
