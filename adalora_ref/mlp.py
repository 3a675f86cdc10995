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
class NetGrads:
    """Gradients of one backward pass: triplets by layer name, trainable base parameters by peft's name."""

    triplets: dict[str, TripletGrads]
    base: dict[str, Array]


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

    def backward(self, cache: MLPCache, grad_y: Array) -> NetGrads:
        """From dL/dy: the trainable adapter's triplet gradients and the trainable base parameters'
        gradients (model.base_trainables(): biases under bias "all" / "lora_only", modules_to_save)."""
        xp = namespace(grad_y)
        model, names = self.model, self.model.names
        fan = model.config.fan_in_fan_out
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
            wanted = base_wanted.get(name, {})
            if wanted:
                g2d = xp.reshape(g, (-1, g.shape[-1]))  # (n, out)
                h = layer_cache.x2d if isinstance(layer_cache, ForwardCache) else layer_cache
                h2d = xp.reshape(h, (-1, h.shape[-1]))  # (n, in)
                if "bias" in wanted:
                    grads.base[wanted["bias"]] = xp.sum(g2d, axis=0)  # (out,)
                if "weight" in wanted:  # (out, in), or (in, out) with fan_in_fan_out
                    gw = xp.matrix_transpose(g2d) @ h2d
                    grads.base[wanted["weight"]] = xp.matrix_transpose(gw) if fan else gw
            if isinstance(layer_cache, ForwardCache):
                g, triplet_grads = model.adapted[name].backward(layer_cache, g)
                if triplet_grads is not None:
                    grads.triplets[name] = triplet_grads
            elif k > 0:  # a frozen layer: only the input gradient, and none needed for the first layer
                g = linear_input_grad(g, model.base[name].weight, fan)
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
