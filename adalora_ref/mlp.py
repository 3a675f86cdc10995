"""A feed-forward network on an AdaLoraModel, forward and backward by hand, and its losses.

The network applies the model's layers in order with ReLU between them (none after the last):

    h_0 = x;  h_k = relu(layer_k(h_{k-1})) for k < L;  y = layer_L(h_{L-1})

Linear layers take (..., in); conv layers take (N, C, H, W). Where a conv layer's (N, C, H, W)
output meets a linear layer it is flattened to (N, C*H*W), as torch.flatten(h, 1), so a small
CNN (convs, then a linear head) is a network too. Adapted layers are SVDLinear / SVDConv2d
(trainable triplet); the others are frozen BaseLinear / BaseConv2d layers whose weight or bias
trains only where the config says so (bias modes, modules_to_save: model.base_trainables()).

Every layer, linear or conv, is a matrix product over rows: the input rows x2d (n, in) (for a
conv, the im2col patches (N*Ho*Wo, C*kh*kw)) times the weight. The gradient of a trained base
weight is g2d^T @ x2d and of a bias the sum of g2d's rows, g2d (n, out) the output gradient in
the same row order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._backend import Array, check_dtype, check_shape, namespace
from .conv import (
    BaseConv2d,
    Conv2dCache,
    FrozenConv2dCache,
    SVDConv2d,
    conv2d_forward,
    conv2d_input_grad,
    image_to_rows,
)
from .layer import ForwardCache, TripletGrads, linear_forward, linear_input_grad
from .model import AdaLoraModel, BaseLinear


@dataclass
class NetGrads:
    """Gradients of one backward pass: triplets by layer name, trainable base parameters by peft's name."""

    triplets: dict[str, TripletGrads]
    base: dict[str, Array]


@dataclass
class MLPCache:
    """Per layer: its cache (SVDLinear / SVDConv2d cache, a frozen conv's cache, or a frozen linear
    layer's input), the pre-activation for ReLU, and the 4-D shape of an input that was flattened."""

    layer_caches: list[Any]
    pre_activations: list[Array]
    flattened_from: list[tuple[int, ...] | None]


class MLP:
    """Sequential linear and conv layers with ReLU between them, over an AdaLoraModel's named layers."""

    def __init__(self, model: AdaLoraModel) -> None:
        self.model = model

    def forward(self, x: Array, dropout_masks: Mapping[str, Array] | None = None) -> tuple[Array, MLPCache]:
        """y from x ((..., in) for a first linear layer, (N, C, H, W) for a first conv layer).

        `dropout_masks`: adapted layer name -> its dropout multiplier (shaped as that layer's input).
        """
        xp = namespace(x)
        masks = dict(dropout_masks or {})
        unknown = sorted(set(masks) - set(self.model.adapted))
        if unknown:
            raise ValueError(f"dropout masks given for layers without an adapter: {unknown}")
        cache = MLPCache([], [], [])
        h = x
        names = self.model.names
        for k, name in enumerate(names):
            layer = self.model.layer(name)
            is_conv = isinstance(layer, (BaseConv2d, SVDConv2d))
            flattened_from = None
            if is_conv and len(h.shape) != 4:
                raise ValueError(f"conv layer {name!r} needs a 4-D input (N, C, H, W), got shape {tuple(h.shape)}")
            if not is_conv and len(h.shape) == 4:
                flattened_from = tuple(h.shape)
                h = xp.reshape(h, (h.shape[0], -1))  # (N, C*H*W), as torch.flatten(h, 1)
            if name in self.model.adapted:
                z, layer_cache = self.model.adapted[name].forward(h, masks.get(name))
            elif isinstance(layer, BaseConv2d):
                z, layer_cache = conv2d_forward(h, layer, name)
            else:
                assert isinstance(layer, BaseLinear)
                self._check_linear_input(name, layer, h)
                z = linear_forward(h, layer.weight, layer.bias, self.model.config.fan_in_fan_out)
                layer_cache = h
            cache.layer_caches.append(layer_cache)
            cache.pre_activations.append(z)
            cache.flattened_from.append(flattened_from)
            h = z if k == len(names) - 1 else xp.maximum(z, xp.zeros_like(z))  # ReLU
        return h, cache

    def _check_linear_input(self, name: str, layer: BaseLinear, h: Array) -> None:
        """A frozen linear layer's input must end in its in_features and share its dtype."""
        fan = self.model.config.fan_in_fan_out
        n_in = layer.weight.shape[0] if fan else layer.weight.shape[1]
        if len(h.shape) < 1 or h.shape[-1] != n_in:
            raise ValueError(
                f"{name}: input has shape {tuple(h.shape)}, its last dimension must be in_features = {n_in}"
            )
        check_dtype(f"{name} input", h, layer.weight.dtype)

    def backward(self, cache: MLPCache, grad_y: Array) -> NetGrads:
        """From dL/dy: the trainable adapter's triplet gradients and the trainable base parameters'
        gradients (model.base_trainables(): biases under bias "all" / "lora_only", modules_to_save)."""
        xp = namespace(grad_y)
        model, names = self.model, self.model.names
        base_wanted: dict[str, dict[str, str]] = {}  # layer -> {"weight" | "bias": peft name}
        for key, (layer_name, attr) in model.base_trainables().items():
            base_wanted.setdefault(layer_name, {})[attr] = key
        grads = NetGrads({}, {})
        g = grad_y
        for k in range(len(names) - 1, -1, -1):
            name = names[k]
            if k != len(names) - 1:
                g = xp.where(cache.pre_activations[k] > 0, g, xp.zeros_like(g))  # through ReLU
            layer_cache = cache.layer_caches[k]
            if name in base_wanted:
                grads.base.update(self._base_grads(name, layer_cache, g, base_wanted[name]))
            if name in model.adapted:
                g, triplet_grads = model.adapted[name].backward(layer_cache, g)
                if triplet_grads is not None:
                    grads.triplets[name] = triplet_grads
            elif k > 0:  # a frozen layer: only the input gradient, and none needed for the first layer
                layer = model.base[name]
                if isinstance(layer, BaseConv2d):
                    g = conv2d_input_grad(layer_cache, g, layer)
                else:
                    g = linear_input_grad(g, layer.weight, model.config.fan_in_fan_out)
            shape = cache.flattened_from[k]
            if shape is not None and k > 0:
                g = xp.reshape(g, shape)  # back to (N, C, H, W) for the conv layer before
        return grads

    def _base_grads(self, name: str, layer_cache: Any, g: Array, wanted: Mapping[str, str]) -> dict[str, Array]:
        """The gradients of layer `name`'s trained weight and / or bias from its output gradient g."""
        xp = namespace(g)
        if isinstance(layer_cache, Conv2dCache):  # an adapted conv: its SVDLinear cache holds the patches
            x2d, g2d = layer_cache.linear.x2d, image_to_rows(g)  # (N*Ho*Wo, C*kh*kw), (N*Ho*Wo, out)
        elif isinstance(layer_cache, FrozenConv2dCache):
            x2d, g2d = layer_cache.x2d, image_to_rows(g)
        else:  # a linear layer: rows of the input, leading dimensions flattened
            h = layer_cache.x2d if isinstance(layer_cache, ForwardCache) else layer_cache
            rows = math.prod(h.shape[:-1])  # n, spelled out: -1 is ambiguous for a zero-width layer
            x2d, g2d = xp.reshape(h, (rows, h.shape[-1])), xp.reshape(g, (rows, g.shape[-1]))  # (n, in), (n, out)
        out: dict[str, Array] = {}
        if "bias" in wanted:
            out[wanted["bias"]] = xp.sum(g2d, axis=0)  # (out,)
        if "weight" in wanted:
            weight = self.model.layer(name).weight
            gw = xp.matrix_transpose(g2d) @ x2d  # (out, in)
            if len(weight.shape) == 4:
                gw = xp.reshape(gw, tuple(weight.shape))  # (out, C, kh, kw)
            elif self.model.config.fan_in_fan_out:
                gw = xp.matrix_transpose(gw)  # (in, out)
            out[wanted["weight"]] = gw
        return out


def mse_loss(y: Array, target: Array) -> tuple[Array, Array]:
    """torch.nn.functional.mse_loss (mean reduction) and its gradient with respect to y.

    An empty batch is refused (ValueError): its mean has no value (torch returns NaN and a NaN step).
    """
    check_shape("target", target, tuple(y.shape))
    xp = namespace(y, target)
    n = math.prod(y.shape)
    if n == 0:
        raise ValueError(f"mse_loss: the batch is empty (y has shape {tuple(y.shape)}): a mean over no elements")
    diff = y - target
    return xp.mean(diff * diff), diff * (2.0 / n)


def cross_entropy_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
    """torch.nn.functional.cross_entropy (mean over the batch) for logits (n, C), integer labels (n,).

    An empty batch (n = 0) is refused (ValueError): its mean has no value (torch returns NaN).
    """
    xp = namespace(logits, labels)
    if len(logits.shape) != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(logits.shape)}")
    n, n_classes = logits.shape
    check_shape("labels", labels, (n,))
    if n == 0:
        raise ValueError(
            f"cross_entropy_loss: the batch is empty (logits have shape {tuple(logits.shape)}): a mean over no samples"
        )
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must be integers (class indexes), got dtype {labels.dtype}")
    if int(xp.min(labels)) < 0 or int(xp.max(labels)) >= n_classes:
        raise ValueError(
            f"labels must lie in [0, {n_classes}), got range [{int(xp.min(labels))}, {int(xp.max(labels))}]"
        )
    shifted = logits - xp.max(logits, axis=1, keepdims=True)  # (n, C)
    log_z = xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))  # (n, 1)
    log_probs = shifted - log_z  # (n, C)
    one_hot = xp.astype(xp.arange(n_classes, device=labels.device)[None, :] == labels[:, None], logits.dtype)
    loss = -xp.sum(log_probs * one_hot) / n
    grad = (xp.exp(log_probs) - one_hot) / n
    return loss, grad
