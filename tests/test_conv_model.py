"""Conv layers inside a model and a network, on every backend: the whole backward of a small CNN
(adapted and frozen convs, a flatten, linear layers; trained biases and a modules_to_save conv)
against central differences, the lifecycle over conv triplets, and errors for bad networks."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_ref._backend import to_numpy
from adalora_ref.config import AdaLoraConfig
from adalora_ref.conv import BaseConv2d, SVDConv2d
from adalora_ref.layer import SVDTriplet
from adalora_ref.mlp import MLP, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

from .conftest import Backend
from .test_layer import assert_close

IMAGE = (2, 6, 5)  # (C, H, W)


def cnn_layers(be: Backend, rng: np.random.Generator) -> dict:
    """stem (2 -> 3, 3x3, pad 1; frozen), conv (3 -> 4, 2x2, stride 2, adapted), fc (4*3*2 -> 5), out (5 -> 2)."""

    def arr(*shape: int) -> object:
        return be.asarray(rng.normal(size=shape) / 2)

    return {
        "stem": BaseConv2d(arr(3, 2, 3, 3), arr(3), padding=1),
        "conv": BaseConv2d(arr(4, 3, 2, 2), arr(4), stride=2),
        "fc": BaseLinear(arr(5, 24), arr(5)),
        "out": BaseLinear(arr(2, 5), arr(2)),
    }


def cnn(be: Backend, **config_fields: object) -> AdaLoraModel:
    rng = np.random.default_rng(0)
    fields = {"target_modules": ["conv", "fc"], "init_r": 3, "target_r": 2, "total_step": 20, **config_fields}
    model = AdaLoraModel(cnn_layers(be, rng), AdaLoraConfig(**fields))
    model.set_lora_E({n: be.asarray(rng.normal(size=(3, 1))) for n in model.adapted})  # E starts at 0: move it
    return model


def loss_of(model: AdaLoraModel, x: object, target: object) -> float:
    return float(to_numpy(mse_loss(MLP(model).forward(x)[0], target)[0]))


def test_cnn_backward_matches_central_differences(xp64: Backend) -> None:
    be = xp64
    model = cnn(be, bias="all", modules_to_save=["stem"])
    assert isinstance(model.adapted["conv"], SVDConv2d)
    rng = np.random.default_rng(1)
    x, target = be.asarray(rng.normal(size=(3, *IMAGE))), be.asarray(rng.normal(size=(3, 2)))
    y, cache = MLP(model).forward(x)
    grads = MLP(model).backward(cache, mse_loss(y, target)[1])
    assert sorted(grads.base) == [
        "conv.base_layer.bias",
        "fc.base_layer.bias",
        "out.bias",
        "stem.modules_to_save.default.bias",
        "stem.modules_to_save.default.weight",
    ]
    h = 1e-6

    def numeric(get, put) -> np.ndarray:
        value = to_numpy(get())
        out = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            for sign in (1, -1):
                moved = value.copy()
                moved[idx] += sign * h
                put(be.asarray(moved))
                out[idx] += sign * loss_of(model, x, target) / (2 * h)
            put(be.asarray(value))
        return out

    for name, g in grads.triplets.items():
        for part in ("lora_A", "lora_E", "lora_B"):

            def put(v, name=name, part=part) -> None:
                t = model.triplets()[name]
                model.set_triplets({name: SVDTriplet(**{**vars(t), part: v})})

            expected = numeric(lambda name=name, part=part: getattr(model.triplets()[name], part), put)
            assert_close(getattr(g, part), expected, 1e-6, f"{name}.{part}")
    for key, g in grads.base.items():
        expected = numeric(lambda key=key: model.base_params()[key], lambda v, key=key: model.set_base_params({key: v}))
        assert_close(g, expected, 1e-6, key)


def test_cnn_trains_through_the_lifecycle(xp: Backend) -> None:
    """Masking and the final rank pattern cover the conv triplet; resizing shrinks A's patch-wide rows."""
    model = cnn(xp, tinit=2, tfinal=4, deltaT=2)
    net, opt, rng = MLP(model), AdamW(lr=0.05), np.random.default_rng(3)
    for step in range(1, 21):
        x, target = xp.asarray(rng.normal(size=(4, *IMAGE))), xp.asarray(rng.normal(size=(4, 2)))
        result = train_step(net, opt, x, target, step, mse_loss)
        assert np.isfinite(result.loss)
    pattern = model.config.rank_pattern
    assert pattern is not None and set(pattern) == {"conv.lora_E", "fc.lora_E"}
    assert sum(sum(keep) for keep in pattern.values()) == 2 * 2  # target_r * layers
    before = to_numpy(net.forward(x)[0])
    model.resize_by_rank_pattern()
    kept = sum(pattern["conv.lora_E"])
    assert model.adapted["conv"].triplet.lora_A.shape == (kept, 3 * 2 * 2)
    assert float(to_numpy(model.adapted["conv"].ranknum)[0]) == (3.0 if kept else 0.0)
    assert_close(to_numpy(net.forward(x)[0]), before, 10 * xp.rtol, "outputs after resizing")


def test_network_errors_name_the_layer() -> None:
    be = Backend("numpy", __import__("numpy"), "float64")
    model = cnn(be)
    with pytest.raises(ValueError, match=r"conv layer 'stem' needs a 4-D input \(N, C, H, W\), got shape \(3, 10\)"):
        MLP(model).forward(np.zeros((3, 10)))
    with pytest.raises(ValueError, match=r"stem: input has shape \(3, 4, 6, 5\), expected \(N, 2, H, W\)"):
        MLP(model).forward(np.zeros((3, 4, 6, 5)))
    with pytest.raises(ValueError, match=r"conv: input of spatial size \(1, 1\) padded to 1 along one axis is smaller"):
        MLP(model).forward(np.zeros((3, 2, 1, 1)))  # the stem keeps 1x1; the 2x2 kernel of conv does not fit
    linear_only = AdaLoraModel(
        {"a": BaseLinear(np.zeros((3, 4))), "b": BaseLinear(np.zeros((2, 5)))},
        AdaLoraConfig(target_modules=["a"], total_step=10),
    )
    with pytest.raises(ValueError, match="b: input has shape \\(7, 3\\), its last dimension must be in_features = 5"):
        MLP(linear_only).forward(np.zeros((7, 4)))
    layers = cnn_layers(be, np.random.default_rng(0))
    layers["conv"] = BaseConv2d(np.zeros((4, 1, 2, 2)), None, groups=3)
    with pytest.raises(ValueError, match="conv: groups = 3 is not supported"):
        AdaLoraModel(layers, AdaLoraConfig(target_modules=["conv"], total_step=10))
    layers["conv"] = "not a layer"
    with pytest.raises(ValueError, match="layer 'conv' is a str, not a BaseLinear or BaseConv2d"):
        AdaLoraModel(layers, AdaLoraConfig(target_modules=["fc"], total_step=10))
