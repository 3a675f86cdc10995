"""The SVD-parameterized 2-D convolution of AdaLoRA (peft's `SVDConv2d`), forward and backward by hand.

One adapted convolution computes, as peft 0.21.2 does,

    y = conv2d(x, W, b) + conv2d(dropout(x), delta_w)
    delta_w = (B @ (A * E) * scaling / (ranknum + 1e-5)).reshape(W.shape)

with W the frozen kernel (out_channels, in_channels, kh, kw), A = lora_A (r, in_channels * kh * kw),
E = lora_E (r, 1) and B = lora_B (out_channels, r); both convolutions share the base layer's stride,
padding and dilation. A convolution is a linear layer applied to every patch of the input: with
`im2col` laying the patches out as rows whose columns are ordered (C, kh, kw), as torch flattens a
kernel, the layer is exactly an `SVDLinear` over the flattened kernel W.reshape(out, in * kh * kw):

    forward:  x (N, C, H, W) --im2col--> (N*Ho*Wo, C*kh*kw) --SVDLinear--> (N*Ho*Wo, out) --> (N, out, Ho, Wo)
    backward: the same path in reverse, with `col2im` (the adjoint of im2col) at the end.

So `scaling` and `ranknum` follow SVDLinear's rules (scaling = lora_alpha, or r when lora_alpha == 0;
ranknum = the initial r) and the forward never forms delta_w; only `delta_weight` and `merge` do.

What peft cannot run, this module refuses:
- groups != 1. peft's A spans all in_channels * kh * kw inputs while a grouped kernel is
  (out, in_channels / groups, kh, kw), so its reshape of B @ (A * E) fails in forward,
  get_delta_weight and merge (e.g. "shape '[6, 2, 3, 3]' is invalid for input of size 216").
Only zero padding is modelled. peft pads the adapter's convolution with zeros whatever the base
layer's `padding_mode` ("reflect", "circular", ...), so with another mode merging changes its outputs.

This module owns im2col / col2im and the convolution wrapper. The adapter math (forward, backward,
delta weight, merging) is SVDLinear's, in layer.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._backend import Array, check_dtype, check_shape, device_of, dtype_name_or_raise, namespace, shown
from .layer import LoraAdapter, SVDLinear, SVDTriplet, TripletGrads, linear_forward, linear_input_grad

IntPair = int | tuple[int, int]
Padding = IntPair | str
"""int, (h, w), or torch's strings "valid" (no padding) and "same" (output as large as the input, stride 1)."""


def _pair(name: str, value: IntPair, minimum: int) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints, each at least `minimum`; ValueError naming `name` otherwise."""
    pair = (value, value) if isinstance(value, int) else value
    ints = isinstance(pair, tuple | list) and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
    if not ints or len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {shown(value)}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    return pair[0], pair[1]


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, stride, dilation and the zero padding of each side, all as (h, w) pairs of ints."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad_before: tuple[int, int]  # rows added on top, columns added on the left
    pad_after: tuple[int, int]  # rows added at the bottom, columns added on the right

    @classmethod
    def of(cls, kernel_size: IntPair, stride: IntPair, padding: Padding, dilation: IntPair) -> ConvGeometry:
        kernel = _pair("kernel_size", kernel_size, 1)
        strides = _pair("stride", stride, 1)
        dilations = _pair("dilation", dilation, 1)
        if padding == "valid":
            return cls(kernel, strides, dilations, (0, 0), (0, 0))
        if padding == "same":
            if strides != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride {shown(stride)}")
            # torch: the dilated kernel overhangs by d * (k - 1) in all; the smaller half goes before,
            # so an odd total puts the extra row / column at the bottom / right.
            totals = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
            before = (totals[0] // 2, totals[1] // 2)
            return cls(kernel, strides, dilations, before, (totals[0] - before[0], totals[1] - before[1]))
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {shown(padding)}")
        pads = _pair("padding", padding, 0)
        return cls(kernel, strides, dilations, pads, pads)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(Ho, Wo): the number of kernel positions along each axis; ValueError when there is none."""
        out = []
        for size, k, s, d, before, after in zip(
            (height, width), self.kernel, self.stride, self.dilation, self.pad_before, self.pad_after, strict=True
        ):
            span = d * (k - 1) + 1  # the dilated kernel's extent
            padded = size + before + after
            if padded < span:
                raise ValueError(
                    f"input of spatial size {(height, width)} padded to {padded} along one axis is smaller than "
                    f"the dilated kernel's extent {span} (kernel {self.kernel}, dilation {self.dilation})"
                )
            out.append((padded - span) // s + 1)
        return out[0], out[1]

    def tap(self, i: int, j: int, out_hw: tuple[int, int]) -> tuple[slice, slice]:
        """The rows and columns of the padded input that kernel tap (i, j) meets, one per output position."""
        (sh, sw), (dh, dw), (ho, wo) = self.stride, self.dilation, out_hw
        return slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)


def _zero_pad(x: Array, before: tuple[int, int], after: tuple[int, int]) -> Array:
    """x (N, C, H, W) with zero rows / columns concatenated around it (the array API has no pad)."""
    xp = namespace(x)
    n, c, _, _ = x.shape

    def zeros(shape: tuple[int, ...]) -> Array:
        return xp.zeros(shape, dtype=x.dtype, device=device_of(x))

    if before[0] or after[0]:
        w = x.shape[3]
        x = xp.concat([zeros((n, c, before[0], w)), x, zeros((n, c, after[0], w))], axis=2)  # (N, C, Hp, W)
    if before[1] or after[1]:
        h = x.shape[2]
        x = xp.concat([zeros((n, c, h, before[1])), x, zeros((n, c, h, after[1]))], axis=3)  # (N, C, Hp, Wp)
    return x


def im2col(
    x: Array, kernel_size: IntPair, stride: IntPair = 1, padding: Padding = 0, dilation: IntPair = 1
) -> tuple[Array, tuple[int, int]]:
    """The patches of x (N, C, H, W) under a sliding kernel, as rows: ((N*Ho*Wo, C*kh*kw), (Ho, Wo)).

    Row n*Ho*Wo + p*Wo + q holds the patch of output position (p, q) of sample n; column c*kh*kw + i*kw + j
    holds x_padded[n, c, p*sh + i*dh, q*sw + j*dw], the order of torch's kernel.reshape(out, -1). So a
    convolution is `im2col(x) @ kernel.reshape(out, -1).T`.
    """
    xp = namespace(x)
    if len(x.shape) != 4:
        raise ValueError(f"im2col needs a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    geo = ConvGeometry.of(kernel_size, stride, padding, dilation)
    n, c, h, w = x.shape
    ho, wo = geo.output_size(h, w)
    kh, kw = geo.kernel
    x_padded = _zero_pad(x, geo.pad_before, geo.pad_after)  # (N, C, Hp, Wp)
    taps = []
    for i in range(kh):
        for j in range(kw):
            rows, cols = geo.tap(i, j, (ho, wo))
            taps.append(x_padded[:, :, rows, cols])  # (N, C, Ho, Wo): what tap (i, j) meets at every position
    stacked = xp.stack(taps, axis=2)  # (N, C, kh*kw, Ho, Wo)
    patches = xp.permute_dims(stacked, (0, 3, 4, 1, 2))  # (N, Ho, Wo, C, kh*kw)
    return xp.reshape(patches, (n * ho * wo, c * kh * kw)), (ho, wo)


def col2im(
    patches_grad: Array,
    x_shape: tuple[int, int, int, int],
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> Array:
    """The adjoint of `im2col`: dL/dx (N, C, H, W) from dL/dpatches (N*Ho*Wo, C*kh*kw).

    Each input element receives the sum of the gradients of every patch entry it was copied into;
    the gradients that land on the padding are dropped.
    """
    xp = namespace(patches_grad)
    geo = ConvGeometry.of(kernel_size, stride, padding, dilation)
    n, c, h, w = x_shape
    ho, wo = geo.output_size(h, w)
    kh, kw = geo.kernel
    check_shape("col2im patches_grad", patches_grad, (n * ho * wo, c * kh * kw))
    g = xp.reshape(patches_grad, (n, ho, wo, c, kh * kw))  # (N, Ho, Wo, C, kh*kw)
    g = xp.permute_dims(g, (0, 3, 4, 1, 2))  # (N, C, kh*kw, Ho, Wo)
    (top, left), (bottom, right) = geo.pad_before, geo.pad_after
    padded_shape = (n, c, h + top + bottom, w + left + right)
    grad_padded = xp.zeros(padded_shape, dtype=patches_grad.dtype, device=device_of(patches_grad))  # (N, C, Hp, Wp)
    for i in range(kh):
        for j in range(kw):
            rows, cols = geo.tap(i, j, (ho, wo))
            grad_padded[:, :, rows, cols] = grad_padded[:, :, rows, cols] + g[:, :, i * kw + j, :, :]
    return grad_padded[:, :, top : top + h, left : left + w]  # (N, C, H, W)


def image_to_rows(y: Array) -> Array:
    """(N, C, Ho, Wo) -> (N*Ho*Wo, C): one row per output position, in im2col's row order."""
    xp = namespace(y)
    n, c, ho, wo = y.shape
    return xp.reshape(xp.permute_dims(y, (0, 2, 3, 1)), (n * ho * wo, c))  # via (N, Ho, Wo, C)


def rows_to_image(y2d: Array, n: int, out_hw: tuple[int, int]) -> Array:
    """(N*Ho*Wo, C) -> (N, C, Ho, Wo): the inverse of `image_to_rows`."""
    xp = namespace(y2d)
    y = xp.reshape(y2d, (n, *out_hw, y2d.shape[1]))  # (N, Ho, Wo, C)
    return xp.permute_dims(y, (0, 3, 1, 2))


def _check_kernel(name: str, weight: Array, bias: Array | None) -> None:
    """A 4-D float kernel (out_channels, in_channels, kh, kw) and a bias (out_channels,) of its dtype, or None."""
    namespace(weight, bias)
    dtype_name_or_raise(f"{name}.weight", weight)
    if len(weight.shape) != 4:
        raise ValueError(f"{name}.weight must be 4-D (out_channels, in_channels, kh, kw), got {tuple(weight.shape)}")
    if bias is not None:
        check_shape(f"{name}.bias", bias, (weight.shape[0],))
        check_dtype(f"{name}.bias", bias, weight.dtype)


@dataclass
class BaseConv2d:
    """A frozen Conv2d (torch.nn.Conv2d's parameters): kernel (out_channels, in_channels, kh, kw), bias
    (out_channels,) or None, and its geometry. Only zero padding and groups = 1 (`conv2d_forward` and
    SVDConv2d compute no other case)."""

    weight: Array
    bias: Array | None = None
    stride: IntPair = 1
    padding: Padding = 0
    dilation: IntPair = 1
    groups: int = 1

    def check(self, name: str) -> None:
        """Refuse, naming the layer, a kernel that is not a 4-D float array, a bias that is not
        (out_channels,) of its dtype, groups other than 1, or a stride / padding / dilation torch refuses."""
        _check_kernel(name, self.weight, self.bias)
        if self.groups != 1:
            raise ValueError(f"{name}: groups = {shown(self.groups)} is not supported (only groups = 1)")
        try:
            ConvGeometry.of(tuple(self.weight.shape[2:]), self.stride, self.padding, self.dilation)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    @property
    def patch_size(self) -> int:
        """in_channels * kh * kw: the length of one im2col row, A's second dimension under an adapter."""
        _, c, kh, kw = self.weight.shape
        return int(c * kh * kw)


@dataclass
class FrozenConv2dCache:
    """What the backward of a frozen convolution needs: the input's shape, (Ho, Wo) and the patches."""

    x_shape: tuple[int, int, int, int]
    out_hw: tuple[int, int]
    x2d: Array  # (N*Ho*Wo, C*kh*kw): the patches, for a weight gradient when the layer trains (modules_to_save)


def conv2d_forward(x: Array, conv: BaseConv2d, name: str = "conv") -> tuple[Array, FrozenConv2dCache]:
    """y = conv2d(x, W, b) for x (N, C, H, W): im2col, one matrix product, back to (N, out, Ho, Wo)."""
    if conv.groups != 1:
        raise ValueError(f"{name}: groups = {conv.groups} is not supported (only groups = 1)")
    xp = namespace(x, conv.weight)
    out_channels, in_channels = conv.weight.shape[:2]
    if len(x.shape) != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name}: input has shape {tuple(x.shape)}, expected (N, {in_channels}, H, W)")
    check_dtype(f"{name} input", x, conv.weight.dtype)
    try:
        patches, out_hw = im2col(x, tuple(conv.weight.shape[2:]), conv.stride, conv.padding, conv.dilation)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    flat_kernel = xp.reshape(conv.weight, (out_channels, conv.patch_size))  # (out, C*kh*kw)
    y2d = linear_forward(patches, flat_kernel, conv.bias)  # (N*Ho*Wo, out)
    return rows_to_image(y2d, x.shape[0], out_hw), FrozenConv2dCache(tuple(x.shape), out_hw, patches)


def conv2d_input_grad(cache: FrozenConv2dCache, grad_y: Array, conv: BaseConv2d) -> Array:
    """dL/dx (N, C, H, W) of a frozen convolution from dL/dy (N, out, Ho, Wo)."""
    xp = namespace(grad_y, conv.weight)
    flat_kernel = xp.reshape(conv.weight, (conv.weight.shape[0], conv.patch_size))  # (out, C*kh*kw)
    grad_patches = linear_input_grad(image_to_rows(grad_y), flat_kernel)  # (N*Ho*Wo, C*kh*kw)
    kernel = tuple(conv.weight.shape[2:])
    return col2im(grad_patches, cache.x_shape, kernel, conv.stride, conv.padding, conv.dilation)


@dataclass
class Conv2dCache:
    """What `SVDConv2d.backward` needs from its forward: the input's shape, (Ho, Wo) and SVDLinear's cache."""

    x_shape: tuple[int, ...]  # (N, C, H, W), or (C, H, W) for an unbatched input
    out_hw: tuple[int, int]
    linear: Any  # the cache of SVDLinear.forward on the patches, handed back to SVDLinear.backward as is


class SVDConv2d:
    """A frozen base Conv2d plus an AdaLoRA adapter (peft's SVDConv2d), as an SVDLinear over patches.

    weight: the kernel (out_channels, in_channels, kh, kw); bias: (out_channels,) or None;
    triplet: lora_A (r, in_channels*kh*kw), lora_E (r, 1), lora_B (out_channels, r).
    `in_features` is in_channels*kh*kw (A's second dimension; peft's own `in_features` attribute is
    in_channels), `out_features` is out_channels. The adapter's state lives in `linear`, the SVDLinear
    over the flattened kernel; `weight` is its weight seen as a kernel, merges included.
    """

    def __init__(
        self,
        weight: Array,
        bias: Array | None,
        triplet: SVDTriplet,
        *,
        lora_alpha: float,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        ranknum: float | None = None,
        name: str = "layer",
        adapter_name: str = "default",
    ) -> None:
        self.name = name
        xp = namespace(weight, bias)
        _check_kernel(name, weight, bias)
        if groups != 1:
            raise ValueError(
                f"{name}: groups = {groups} is not supported; peft 0.21.2's SVDConv2d cannot run it either: its "
                f"lora_A spans in_channels * kh * kw inputs, so B @ (A * E) does not reshape into the grouped "
                f"kernel (out, in_channels / groups, kh, kw) and its forward, get_delta_weight and merge raise"
            )
        out_channels, in_channels, kh, kw = (int(s) for s in weight.shape)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kh, kw)
        self.stride = _pair(f"{name}.stride", stride, 1)
        self.dilation = _pair(f"{name}.dilation", dilation, 1)
        self.padding = padding if isinstance(padding, str) else _pair(f"{name}.padding", padding, 0)
        self.groups = groups
        try:
            ConvGeometry.of(self.kernel_size, self.stride, self.padding, self.dilation)  # refuse bad padding now
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        flat_kernel = xp.reshape(weight, (out_channels, in_channels * kh * kw))  # (out, in*kh*kw)
        self.linear = SVDLinear(
            flat_kernel, bias, triplet, lora_alpha=lora_alpha, ranknum=ranknum, name=name, adapter_name=adapter_name
        )

    # -- the SVDLinear surface, seen through the kernel's shape ---------------------------------

    @property
    def weight(self) -> Array:
        """The base kernel (out_channels, in_channels, kh, kw), with any merged adapter in it."""
        return namespace(self.linear.weight).reshape(self.linear.weight, self.kernel_shape)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def bias(self) -> Array | None:
        return self.linear.bias

    @bias.setter
    def bias(self, bias: Array | None) -> None:
        self.linear.bias = bias

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def triplet(self) -> SVDTriplet:
        return self.linear.triplet

    @triplet.setter
    def triplet(self, triplet: SVDTriplet) -> None:
        self.linear.triplet = triplet

    @property
    def r(self) -> int:
        return self.linear.r

    @property
    def ranknum(self) -> Array:
        return self.linear.ranknum

    @property
    def scaling(self) -> float:
        return self.linear.scaling

    @property
    def lora_alpha(self) -> float:
        return self.linear.lora_alpha

    @property
    def merged(self) -> bool:
        return self.linear.merged

    # Several adapters: SVDLinear keeps them; these pass its state through unchanged.

    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        return self.linear.adapters

    def add_adapter(
        self, adapter_name: str, triplet: SVDTriplet, *, lora_alpha: float, ranknum: float | None = None
    ) -> None:
        """Add (or replace) an adapter: A (r, in_channels*kh*kw), E (r, 1), B (out_channels, r); not made active."""
        self.linear.add_adapter(adapter_name, triplet, lora_alpha=lora_alpha, ranknum=ranknum)

    @property
    def active_adapters(self) -> list[str]:
        return self.linear.active_adapters

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self.linear.active_adapters = names

    @property
    def trainable_adapter(self) -> str | None:
        return self.linear.trainable_adapter

    @trainable_adapter.setter
    def trainable_adapter(self, name: str | None) -> None:
        self.linear.trainable_adapter = name

    @property
    def merged_adapters(self) -> list[str]:
        return self.linear.merged_adapters

    @property
    def disable_adapters(self) -> bool:
        return self.linear.disable_adapters

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self.linear.disable_adapters = value

    # -- forward and backward -----------------------------------------------------------------

    def _im2col(self, x4: Array) -> tuple[Array, tuple[int, int]]:
        try:
            return im2col(x4, self.kernel_size, self.stride, self.padding, self.dilation)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    def _check_input(self, x: Array, dropout_mask: Array | None) -> None:
        namespace(x, self.linear.weight, dropout_mask)
        if len(x.shape) not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"{self.name}: input has shape {tuple(x.shape)}, expected (N, C, H, W) or (C, H, W) with "
                f"C = in_channels = {self.in_channels}"
            )
        check_dtype(f"{self.name} input", x, self.linear.weight.dtype)
        if dropout_mask is not None:
            check_shape(f"{self.name} dropout_mask", dropout_mask, tuple(x.shape))
            check_dtype(f"{self.name} dropout_mask", dropout_mask, self.linear.weight.dtype)

    def forward(self, x: Array, dropout_mask: Array | None = None) -> tuple[Array, Conv2dCache]:
        """y = conv2d(x, W, b) + conv2d(dropout(x), delta_w), through SVDLinear on the patches.

        x: (N, C, H, W), or (C, H, W) unbatched as torch allows. dropout_mask: None or the array torch's
        dropout multiplies x by (x's shape; 0 where dropped, 1 / (1 - p) where kept). The patches of the
        mask are the mask of the patches, so SVDLinear applies it as it does to a linear input.
        Returns y (N, out_channels, Ho, Wo) (or (out_channels, Ho, Wo)) and the cache for `backward`.
        Merged and disabled adapters behave as in SVDLinear (and peft).
        """
        self._check_input(x, dropout_mask)
        xp = namespace(x)
        batched = len(x.shape) == 4
        x4 = x if batched else xp.expand_dims(x, axis=0)  # (N, C, H, W)
        n = x4.shape[0]
        patches, (ho, wo) = self._im2col(x4)  # (N*Ho*Wo, C*kh*kw)
        mask_patches = None
        if dropout_mask is not None:
            mask4 = dropout_mask if batched else xp.expand_dims(dropout_mask, axis=0)  # (N, C, H, W)
            mask_patches = self._im2col(mask4)[0]  # (N*Ho*Wo, C*kh*kw)
        y2d, linear_cache = self.linear.forward(patches, mask_patches)  # (N*Ho*Wo, out)
        y = rows_to_image(y2d, n, (ho, wo))  # (N, out, Ho, Wo)
        return (y if batched else y[0, ...]), Conv2dCache(tuple(x.shape), (ho, wo), linear_cache)

    def backward(self, cache: Conv2dCache, grad_y: Array) -> tuple[Array, TripletGrads | None]:
        """From dL/dy (N, out_channels, Ho, Wo): dL/dx (x's shape) and the triplet's gradients (None
        when the adapter took no part: merged or disabled), through SVDLinear.backward and col2im."""
        xp = namespace(grad_y)
        ho, wo = cache.out_hw
        batched = len(cache.x_shape) == 4
        n = cache.x_shape[0] if batched else 1
        out_shape = (n, self.out_channels, ho, wo) if batched else (self.out_channels, ho, wo)
        check_shape(f"{self.name} grad_y", grad_y, out_shape)
        check_dtype(f"{self.name} grad_y", grad_y, self.linear.weight.dtype)
        g2d = image_to_rows(xp.reshape(grad_y, (n, self.out_channels, ho, wo)))  # (N*Ho*Wo, out)
        grad_patches, grads = self.linear.backward(cache.linear, g2d)  # (N*Ho*Wo, C*kh*kw)
        x4_shape = (n, *cache.x_shape[-3:])
        grad_x = col2im(grad_patches, x4_shape, self.kernel_size, self.stride, self.padding, self.dilation)
        return xp.reshape(grad_x, cache.x_shape), grads  # (N, C, H, W) or (C, H, W)

    # -- merging ------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str | None = None) -> Array:
        """delta_w = (B @ (A * E) * scaling / (ranknum + 1e-5)), shaped as the kernel (out, in, kh, kw)."""
        delta = self.linear.delta_weight(adapter_name)  # (out, in*kh*kw)
        return namespace(delta).reshape(delta, self.kernel_shape)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add delta_w into the kernel (SVDLinear.merge: safe_merge refuses NaN / Inf and leaves the kernel)."""
        self.linear.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        """Subtract the merged delta_w from the kernel; warns when nothing is merged."""
        self.linear.unmerge()
