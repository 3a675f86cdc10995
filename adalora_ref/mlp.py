"""A multilayer perceptron on an AdaLoraModel, forward and backward by hand, and its losses.

The network applies the model's layers in order with ReLU between them (none after the last):

    h_0 = x;  h_k = relu(layer_k(h_{k-1})) for k < L;  y = layer_L(h_{L-1})

Adapted layers are SVDLinear (trainable triplet); the others are frozen BaseLinear layers. The
backward returns the gradients of the triplets only: base weights never train.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._backend import Array, check_shape, namespace
from .layer import ForwardCache, TripletGrads, linear_forward, linear_input_grad
from .model import AdaLoraModel


@dataclass
class MLPCache:
    """Per layer: the SVDLinear cache or the plain layer's input, and the pre-activation for ReLU."""

    layer_caches: list[Any]
    pre_activations: list[Array]


class MLP:
    """Sequential linear layers with ReLU between them, over an AdaLoraModel's named layers."""

    def __init__(self, model: AdaLoraModel) -> None:
        self.model = model

    def forward(self, x: Array, dropout_masks: Mapping[str, Array] | None = None) -> tuple[Array, MLPCache]:
        """y (..., out) from x (..., in). `dropout_masks`: adapted layer name -> its dropout multiplier."""
        xp = namespace(x)
        masks = dict(dropout_masks or {})
        unknown = sorted(set(masks) - set(self.model.adapted))
        if unknown:
            raise ValueError(f"dropout masks given for layers without an adapter: {unknown}")
        cache = MLPCache([], [])
        h = x
        names = self.model.names
        for k, name in enumerate(names):
            if name in self.model.adapted:
                z, layer_cache = self.model.adapted[name].forward(h, masks.get(name))
            else:
                base = self.model.base[name]
                fan = self.model.config.fan_in_fan_out
                z = linear_forward(h, base.weight, base.bias, fan)
                layer_cache = h
            cache.layer_caches.append(layer_cache)
            cache.pre_activations.append(z)
            h = z if k == len(names) - 1 else xp.maximum(z, xp.zeros_like(z))  # ReLU
        return h, cache

    def backward(self, cache: MLPCache, grad_y: Array) -> dict[str, TripletGrads]:
        """The triplets' gradients, by layer name, from dL/dy."""
        xp = namespace(grad_y)
        names = self.model.names
        grads: dict[str, TripletGrads] = {}
        g = grad_y
        for k in range(len(names) - 1, -1, -1):
            name = names[k]
            if k != len(names) - 1:
                g = xp.where(cache.pre_activations[k] > 0, g, xp.zeros_like(g))  # through ReLU
            layer_cache = cache.layer_caches[k]
            if isinstance(layer_cache, ForwardCache):
                g, triplet_grads = self.model.adapted[name].backward(layer_cache, g)
                if triplet_grads is not None:
                    grads[name] = triplet_grads
            elif k > 0:  # a frozen layer: only the input gradient, and none needed for the first layer
                g = linear_input_grad(g, self.model.base[name].weight, self.model.config.fan_in_fan_out)
        return grads


def mse_loss(y: Array, target: Array) -> tuple[Array, Array]:
    """torch.nn.functional.mse_loss (mean reduction) and its gradient with respect to y."""
    check_shape("target", target, tuple(y.shape))
    xp = namespace(y, target)
    diff = y - target
    n = 1
    for d in y.shape:
        n *= d
    return xp.mean(diff * diff), diff * (2.0 / n)


def cross_entropy_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
    """torch.nn.functional.cross_entropy (mean over the batch) for logits (n, C), integer labels (n,)."""
    xp = namespace(logits, labels)
    if len(logits.shape) != 2:
        raise ValueError(f"logits must be 2-D (n, classes), got shape {tuple(logits.shape)}")
    n, n_classes = logits.shape
    check_shape("labels", labels, (n,))
    if n and (int(xp.min(labels)) < 0 or int(xp.max(labels)) >= n_classes):
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
