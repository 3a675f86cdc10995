"""SVDConv2d and im2col / col2im: against loop formulas and finite differences on every backend, and live
against peft 0.21.2's SVDConv2d in float64 (output, input and triplet gradients, delta weight, merging)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adalora_ref._backend import get_backend
from adalora_ref.conv import SVDConv2d, col2im, im2col
from adalora_ref.layer import SVDTriplet

from .conftest import Backend
from .peft_live import require_peft, t2n
from .test_layer import assert_close

PARTS = ("lora_A", "lora_E", "lora_B")
fixture_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- loop formulas in float64 NumPy, written independently of conv.py ---------------------------


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def pads_of(padding, kernel, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)); torch's 'same' puts the odd extra row / column after."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(pair(dilation), pair(kernel), strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    ph, pw = pair(padding)
    return (ph, ph), (pw, pw)


def loop_im2col(x: np.ndarray, kernel, stride, padding, dilation) -> np.ndarray:
    """patches[n*Ho*Wo + p*Wo + q, c*kh*kw + i*kw + j] = x_padded[n, c, p*sh + i*dh, q*sw + j*dw], one by one."""
    (kh, kw), (sh, sw), (dh, dw) = pair(kernel), pair(stride), pair(dilation)
    xpad = np.pad(x, ((0, 0), (0, 0), *pads_of(padding, kernel, dilation)))
    n, c, hp, wp = xpad.shape
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n * ho * wo, c * kh * kw))
    for b, ch, p, q, i, j in np.ndindex(n, c, ho, wo, kh, kw):
        out[b * ho * wo + p * wo + q, ch * kh * kw + i * kw + j] = xpad[b, ch, p * sh + i * dh, q * sw + j * dw]
    return out


def loop_conv2d(x: np.ndarray, kernel: np.ndarray, stride, padding, dilation) -> np.ndarray:
    """y[n, o, p, q] = sum over c, i, j of kernel[o, c, i, j] * x_padded[n, c, p*sh + i*dh, q*sw + j*dw]."""
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    kh, kw = kernel.shape[2:]
    xpad = np.pad(x, ((0, 0), (0, 0), *pads_of(padding, (kh, kw), dilation)))
    ho, wo = (xpad.shape[2] - dh * (kh - 1) - 1) // sh + 1, (xpad.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((x.shape[0], kernel.shape[0], ho, wo))
    for p, q, i, j in np.ndindex(ho, wo, kh, kw):
        y[:, :, p, q] += xpad[:, :, p * sh + i * dh, q * sw + j * dw] @ kernel[:, :, i, j].T
    return y


def dense_reference(p: dict, x: np.ndarray, lora_alpha: float, geo: dict, mask=None) -> np.ndarray:
    """conv(x, W) + b + conv(x * mask, delta_w), delta_w = (B diag(E) A * s / (r + 1e-5)).reshape(W.shape)."""
    r = p["lora_A"].shape[0]
    scaling = lora_alpha if lora_alpha > 0 else float(r)
    delta = (p["lora_B"] @ np.diag(p["lora_E"][:, 0]) @ p["lora_A"] * scaling / (r + 1e-5)).reshape(p["weight"].shape)
    xd = x if mask is None else x * mask
    args = (geo["stride"], geo["padding"], geo["dilation"])
    y = loop_conv2d(x, p["weight"], *args) + loop_conv2d(xd, delta, *args)
    return y if p["bias"] is None else y + p["bias"][:, None, None]


# -- random geometries and layers ---------------------------------------------------------------


@st.composite
def geometries(draw, max_channels: int = 3, max_extra: int = 3) -> dict:
    """A convolution with at least one output position: kernel 1..3, stride 1..2, padding 0..2 / 'valid' /
    'same', dilation 1..2, each an int or an (h, w) pair, and an input just large enough plus 0..max_extra."""
    side = st.integers(1, 3)
    kernel = draw(st.one_of(side, st.tuples(side, side)))
    dilation = draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    padding = draw(st.sampled_from([0, 1, 2, (0, 2), (1, 0), "valid", "same"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (1, 2), (2, 1)]))
    pads = pads_of(padding, kernel, dilation)
    spans = [d * (k - 1) + 1 for d, k in zip(pair(dilation), pair(kernel), strict=True)]
    hw = [
        draw(st.integers(max(1, span - sum(pad)), max(1, span - sum(pad)) + max_extra))
        for span, pad in zip(spans, pads, strict=True)
    ]
    return {
        "n": draw(st.integers(1, 2)),
        "c": draw(st.integers(1, max_channels)),
        "hw": tuple(hw),
        "kernel": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@st.composite
def layer_cases(draw, max_extra: int = 3) -> dict:
    return {
        **draw(geometries(max_channels=2, max_extra=max_extra)),
        "out": draw(st.integers(1, 3)),
        "r": draw(st.integers(0, 2)),
        "bias": draw(st.booleans()),
        "lora_alpha": draw(st.sampled_from([0, 1, 8])),
        "dropout": draw(st.booleans()),
    }


def make_params(rng: np.random.Generator, r: int, c_in: int, c_out: int, kernel, bias: bool) -> dict:
    """Random float64 NumPy parameters of one layer, E non-zero so every path is exercised."""
    kh, kw = pair(kernel)
    return {
        "weight": rng.normal(size=(c_out, c_in, kh, kw)),
        "bias": rng.normal(size=(c_out,)) if bias else None,
        "lora_A": rng.normal(size=(r, c_in * kh * kw)),
        "lora_E": rng.normal(size=(r, 1)),
        "lora_B": rng.normal(size=(c_out, r)),
    }


def build(be: Backend, p: dict, geo: dict, *, lora_alpha: float = 8) -> SVDConv2d:
    triplet = SVDTriplet(*(be.asarray(p[k]) for k in PARTS))
    bias = None if p["bias"] is None else be.asarray(p["bias"])
    conv = {k: geo[k] for k in ("stride", "padding", "dilation")}
    return SVDConv2d(be.asarray(p["weight"]), bias, triplet, lora_alpha=lora_alpha, **conv)


def draw_layer_case(case: dict):
    rng = np.random.default_rng(case["seed"])
    p = make_params(rng, case["r"], case["c"], case["out"], case["kernel"], case["bias"])
    x = rng.normal(size=(case["n"], case["c"], *case["hw"]))
    mask = (rng.random(x.shape) > 0.3) / 0.7 if case["dropout"] else None
    return p, x, mask


GEO = {"stride": 1, "padding": 1, "dilation": 1}


def small_layer(be: Backend, seed: int = 0, r: int = 2, bias: bool = True, **kw) -> tuple[SVDConv2d, dict]:
    p = make_params(np.random.default_rng(seed), r, 2, 3, 3, bias)
    return build(be, p, GEO, **kw), p


# -- im2col and col2im ----------------------------------------------------------------------------


def geo_args(g: dict) -> tuple:
    return g["kernel"], g["stride"], g["padding"], g["dilation"]


@given(g=geometries())
@fixture_settings
def test_im2col_matches_loop_formula(xp: Backend, g: dict) -> None:
    x = np.random.default_rng(g["seed"]).normal(size=(g["n"], g["c"], *g["hw"]))
    patches, (ho, wo) = im2col(xp.asarray(x), *geo_args(g))
    expected = loop_im2col(x, *geo_args(g))
    assert expected.shape[0] == g["n"] * ho * wo
    assert_close(xp.to_numpy(patches), expected, xp.rtol, "im2col")


@given(g=geometries())
@fixture_settings
def test_col2im_is_the_adjoint_of_im2col(xp: Backend, g: dict) -> None:
    """<im2col(x), P> == <x, col2im(P)> for random x and P."""
    rng = np.random.default_rng(g["seed"])
    x = rng.normal(size=(g["n"], g["c"], *g["hw"]))
    patches, _ = im2col(xp.asarray(x), *geo_args(g))
    P = rng.normal(size=tuple(patches.shape))
    back = col2im(xp.asarray(P), x.shape, *geo_args(g))
    assert tuple(back.shape) == x.shape
    lhs = float(np.sum(xp.to_numpy(patches) * P))
    rhs = float(np.sum(x * xp.to_numpy(back)))
    scale = float(np.sum(np.abs(xp.to_numpy(patches) * P)))  # the size of the terms summed
    assert abs(lhs - rhs) <= xp.rtol * max(1.0, scale), f"<im2col(x), P> = {lhs!r} but <x, col2im(P)> = {rhs!r}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 0}, r"kernel_size must be >= 1, got 0"),
        ({"kernel_size": 3, "stride": (1, 0)}, r"stride must be >= 1"),
        ({"kernel_size": 3, "padding": -1}, r"padding must be >= 0"),
        ({"kernel_size": (1, 2, 3)}, r"kernel_size must be an int or a pair of ints"),
        ({"kernel_size": 3, "padding": "full"}, r"padding must be an int, a pair of ints, 'valid' or 'same'"),
        ({"kernel_size": 3, "padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
        ({"kernel_size": 4, "dilation": 2}, r"smaller than the dilated kernel's extent 7"),
    ],
)
def test_im2col_refuses_bad_geometry(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        im2col(np.zeros((1, 1, 5, 5)), **kwargs)


def test_im2col_needs_4d_and_col2im_checks_the_gradient_shape() -> None:
    with pytest.raises(ValueError, match=r"4-D input \(N, C, H, W\), got shape \(5, 5\)"):
        im2col(np.zeros((5, 5)), 3)
    with pytest.raises(ValueError, match=r"patches_grad has shape \(9, 9\), expected \(9, 18\)"):
        col2im(np.zeros((9, 9)), (1, 2, 5, 5), 3)


# -- SVDConv2d: forward, backward, merging, bad input on every backend ---------------------------


@given(case=layer_cases())
@fixture_settings
def test_forward_matches_dense_formula(xp: Backend, case: dict) -> None:
    p, x, mask = draw_layer_case(case)
    layer = build(xp, p, case, lora_alpha=case["lora_alpha"])
    y, _ = layer.forward(xp.asarray(x), None if mask is None else xp.asarray(mask))
    expected = dense_reference(p, x, case["lora_alpha"], case, mask)
    assert_close(xp.to_numpy(y), expected, 100 * xp.rtol, "forward")


@given(case=layer_cases(max_extra=2))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_backward_matches_central_differences(xp64: Backend, case: dict) -> None:
    """Every element of dL/dx, dL/dA, dL/dE, dL/dB against (L(p + h) - L(p - h)) / 2h, L = sum(y * G)."""
    be = xp64
    p, x, mask = draw_layer_case(case)
    m = None if mask is None else be.asarray(mask)
    layer = build(be, p, case, lora_alpha=case["lora_alpha"])
    y, cache = layer.forward(be.asarray(x), m)
    G = np.random.default_rng(case["seed"] + 1).normal(size=tuple(y.shape))
    grad_x, grads = layer.backward(cache, be.asarray(G))
    analytic = {"x": be.to_numpy(grad_x), **{k: be.to_numpy(getattr(grads, k)) for k in PARTS}}

    def loss(params: dict, inp: np.ndarray) -> float:
        y, _ = build(be, params, case, lora_alpha=case["lora_alpha"]).forward(be.asarray(inp), m)
        return float(np.sum(be.to_numpy(y) * G))

    h = 1e-6
    for key, analytic_grad in analytic.items():
        base = x if key == "x" else p[key]
        numeric = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[idx] += h
            minus[idx] -= h
            if key == "x":
                numeric[idx] = (loss(p, plus) - loss(p, minus)) / (2 * h)
            else:
                numeric[idx] = (loss({**p, key: plus}, x) - loss({**p, key: minus}, x)) / (2 * h)
        assert_close(analytic_grad, numeric, 1e-6, f"d loss / d {key}")


def test_unbatched_input_is_one_sample(xp: Backend) -> None:
    layer, _ = small_layer(xp)
    rng = np.random.default_rng(1)
    x, mask = rng.normal(size=(2, 4, 5)), (rng.random((2, 4, 5)) > 0.5) * 2.0
    G = rng.normal(size=(3, 4, 5))
    y3, cache3 = layer.forward(xp.asarray(x), xp.asarray(mask))
    y4, cache4 = layer.forward(xp.asarray(x[None]), xp.asarray(mask[None]))
    assert tuple(y3.shape) == (3, 4, 5)
    assert_close(xp.to_numpy(y3), xp.to_numpy(y4)[0], xp.rtol, "unbatched forward")
    gx3, g3 = layer.backward(cache3, xp.asarray(G))
    gx4, g4 = layer.backward(cache4, xp.asarray(G[None]))
    assert_close(xp.to_numpy(gx3), xp.to_numpy(gx4)[0], xp.rtol, "unbatched grad x")
    for k in PARTS:
        assert_close(xp.to_numpy(getattr(g3, k)), xp.to_numpy(getattr(g4, k)), xp.rtol, k)


def test_r_zero_is_the_base_convolution(xp: Backend) -> None:
    layer, p = small_layer(xp, r=0)
    x = np.random.default_rng(2).normal(size=(2, 2, 4, 4))
    y, cache = layer.forward(xp.asarray(x))
    expected = loop_conv2d(x, p["weight"], 1, 1, 1) + p["bias"][:, None, None]
    assert_close(xp.to_numpy(y), expected, 100 * xp.rtol, "r = 0 forward")
    _, grads = layer.backward(cache, xp.asarray(np.ones(tuple(y.shape))))
    assert tuple(grads.lora_A.shape) == (0, 18) and tuple(grads.lora_B.shape) == (3, 0)
    assert layer.r == 0 and float(layer.ranknum[0]) == 0.0
    assert np.all(xp.to_numpy(layer.delta_weight()) == 0.0)


def test_surface(xp: Backend) -> None:
    layer, p = small_layer(xp, lora_alpha=0)
    assert (layer.in_features, layer.out_features, layer.r) == (18, 3, 2)
    assert layer.scaling == 2.0 and layer.lora_alpha == 0  # lora_alpha == 0: scaling is r, as in peft
    assert tuple(layer.weight.shape) == (3, 2, 3, 3) and tuple(layer.bias.shape) == (3,)
    assert not layer.merged and not layer.disable_adapters
    replaced = SVDTriplet(*(xp.asarray(2 * p[k]) for k in PARTS))
    layer.triplet = replaced
    assert layer.triplet is replaced
    with pytest.raises(ValueError, match=r"lora_A has shape \(2, 9\), expected \(2, 18\)"):
        layer.triplet = SVDTriplet(xp.asarray(np.ones((2, 9))), replaced.lora_E, replaced.lora_B)


def test_delta_weight_merge_unmerge(xp: Backend) -> None:
    layer, p = small_layer(xp)
    x = xp.asarray(np.random.default_rng(3).normal(size=(2, 2, 5, 4)))
    dense = (p["lora_B"] @ (p["lora_A"] * p["lora_E"]) * 8 / (2 + 1e-5)).reshape(3, 2, 3, 3)
    assert_close(xp.to_numpy(layer.delta_weight()), dense, 10 * xp.rtol, "delta weight")
    y_unmerged, _ = layer.forward(x)
    layer.merge()
    assert layer.merged
    assert_close(xp.to_numpy(layer.weight), p["weight"] + dense, 10 * xp.rtol, "merged kernel")
    y_merged, cache = layer.forward(x)
    assert_close(xp.to_numpy(y_merged), xp.to_numpy(y_unmerged), 100 * xp.rtol, "merged forward")
    assert layer.backward(cache, xp.asarray(np.ones(tuple(y_merged.shape))))[1] is None
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert_close(xp.to_numpy(layer.weight), p["weight"], 10 * xp.rtol, "unmerged kernel")
    with pytest.warns(UserWarning, match="already unmerged"):
        layer.unmerge()


def test_safe_merge_refuses_non_finite_and_leaves_kernel(xp: Backend) -> None:
    p = make_params(np.random.default_rng(0), 2, 2, 3, 3, True)
    p["lora_A"][0, 0] = np.inf
    layer = build(xp, p, GEO)
    before = xp.to_numpy(layer.weight).copy()
    with pytest.raises(ValueError, match=r"merged weight holds \d+ non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    np.testing.assert_array_equal(xp.to_numpy(layer.weight), before)


def test_disabled_adapters_run_base_only_and_unmerge(xp: Backend) -> None:
    layer, p = small_layer(xp)
    x = np.random.default_rng(4).normal(size=(1, 2, 4, 4))
    layer.merge()
    layer.disable_adapters = True
    y, cache = layer.forward(xp.asarray(x))
    assert not layer.merged  # peft unmerges a merged layer when its adapters are disabled
    assert_close(xp.to_numpy(y), loop_conv2d(x, p["weight"], 1, 1, 1) + p["bias"][:, None, None], 100 * xp.rtol)
    assert layer.backward(cache, xp.asarray(np.ones(tuple(y.shape))))[1] is None


class TestBadInput:
    def test_wrong_channels(self, xp: Backend) -> None:
        with pytest.raises(ValueError, match=r"input has shape \(1, 3, 4, 4\).*C = in_channels = 2"):
            small_layer(xp)[0].forward(xp.asarray(np.ones((1, 3, 4, 4))))

    def test_wrong_rank(self, xp: Backend) -> None:
        with pytest.raises(ValueError, match=r"input has shape \(2, 4\), expected \(N, C, H, W\)"):
            small_layer(xp)[0].forward(xp.asarray(np.ones((2, 4))))

    def test_input_smaller_than_kernel(self, xp: Backend) -> None:
        p = make_params(np.random.default_rng(5), 1, 2, 3, 3, False)
        layer = build(xp, p, {**GEO, "padding": 0}, lora_alpha=8)
        with pytest.raises(ValueError, match=r"layer: input of spatial size \(2, 4\) .* extent 3"):
            layer.forward(xp.asarray(np.ones((1, 2, 2, 4))))

    def test_mixed_dtypes(self, xp: Backend) -> None:
        other = "float32" if xp.dtype_name == "float64" else "float64"
        x = Backend(xp.name, xp.xp, other).asarray(np.ones((1, 2, 4, 4)))
        with pytest.raises(TypeError, match="input has dtype"):
            small_layer(xp)[0].forward(x)

    def test_wrong_dropout_mask_shape(self, xp: Backend) -> None:
        with pytest.raises(ValueError, match=r"dropout_mask has shape \(1, 2, 4, 3\), expected \(1, 2, 4, 4\)"):
            small_layer(xp)[0].forward(xp.asarray(np.ones((1, 2, 4, 4))), xp.asarray(np.ones((1, 2, 4, 3))))

    def test_wrong_grad_shape(self, xp: Backend) -> None:
        layer, _ = small_layer(xp)
        _, cache = layer.forward(xp.asarray(np.ones((1, 2, 4, 4))))
        with pytest.raises(ValueError, match=r"grad_y has shape \(1, 3, 4, 3\), expected \(1, 3, 4, 4\)"):
            layer.backward(cache, xp.asarray(np.ones((1, 3, 4, 3))))

    def test_weight_not_4d_and_triplet_contradicting_it(self, xp: Backend) -> None:
        p = make_params(np.random.default_rng(6), 2, 2, 3, 3, False)
        with pytest.raises(ValueError, match=r"layer.weight must be 4-D .* got \(3, 18\)"):
            build(xp, {**p, "weight": p["weight"].reshape(3, 18)}, GEO)
        with pytest.raises(ValueError, match=r"lora_A has shape \(2, 2\), expected \(2, 18\)"):
            build(xp, {**p, "lora_A": np.ones((2, 2))}, GEO)

    def test_bad_geometry_at_construction(self, xp: Backend) -> None:
        p = make_params(np.random.default_rng(7), 2, 2, 3, 3, False)
        with pytest.raises(ValueError, match=r"layer: padding='same' needs stride 1"):
            build(xp, p, {**GEO, "padding": "same", "stride": 2})
        with pytest.raises(ValueError, match=r"layer.dilation must be >= 1"):
            build(xp, p, {**GEO, "dilation": 0})

    def test_groups_refused_because_peft_cannot_run_them(self, xp: Backend) -> None:
        p = make_params(np.random.default_rng(8), 2, 2, 4, 3, False)
        triplet = SVDTriplet(*(xp.asarray(p[k]) for k in PARTS))
        with pytest.raises(ValueError, match=r"groups = 2 is not supported; peft 0.21.2's SVDConv2d cannot run it"):
            SVDConv2d(xp.asarray(p["weight"]), None, triplet, lora_alpha=8, groups=2)


# -- live against peft 0.21.2 (float64) -----------------------------------------------------------

REL = 1e-12


def peft_conv(c_in: int, c_out: int, kernel, *, r: int, lora_alpha: float, dropout: float = 0.0, **conv):
    """peft's SVDConv2d around a float64 torch Conv2d named "conv", A, E, B standard normal."""
    torch, peft = require_peft()
    root = torch.nn.Module()
    root.add_module("conv", torch.nn.Conv2d(c_in, c_out, kernel, **conv).to(torch.float64))
    config = peft.AdaLoraConfig(
        target_modules=["conv"],
        init_r=r,
        target_r=0,
        total_step=10,
        init_lora_weights=False,
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
    )
    return peft.get_peft_model(root, config).base_model.model.conv


def ours_from_peft(peft_layer, lora_alpha: float) -> SVDConv2d:
    xp = get_backend("numpy")
    base = peft_layer.get_base_layer()
    triplet = SVDTriplet(*(t2n(getattr(peft_layer, k)["default"]) for k in PARTS))
    bias = None if base.bias is None else xp.asarray(t2n(base.bias))
    layer = SVDConv2d(
        xp.asarray(t2n(base.weight)),
        bias,
        triplet,
        lora_alpha=lora_alpha,
        stride=base.stride,
        padding=base.padding,
        dilation=base.dilation,
        name="conv",
    )
    assert float(layer.ranknum[0]) == float(peft_layer.ranknum["default"].detach())
    assert layer.scaling == peft_layer.scaling["default"]
    return layer


# (seed, in, out, kernel, stride, padding, dilation, bias, r, lora_alpha, dropout p, input shape)
CORNERS = [
    (0, 3, 4, 3, 1, 1, 1, True, 3, 8, 0.0, (2, 3, 6, 5)),
    (1, 2, 5, (2, 3), (2, 1), (1, 2), (1, 2), False, 2, 0, 0.0, (1, 2, 7, 8)),
    (2, 4, 3, 1, 1, 0, 1, True, 0, 8, 0.0, (2, 4, 3, 3)),
    (3, 3, 3, 3, 2, 2, 2, True, 4, 16.0, 0.3, (2, 3, 9, 7)),
    (4, 2, 4, (2, 4), 1, "same", (2, 1), True, 1, 0, 0.5, (1, 2, 5, 6)),
    (5, 3, 2, 3, 1, "valid", 1, False, 5, 4, 0.1, (3, 6, 5)),  # unbatched input
]


def random_case(seed: int) -> tuple:
    """A random layer: kernel 1..3 per axis, stride 1..2, padding 0..2 or 'same' / 'valid', dilation 1..2."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.integers(1, 4, size=2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=2))
    padding = [0, 1, 2, (int(rng.integers(0, 3)), int(rng.integers(0, 3))), "same", "valid"][rng.integers(6)]
    stride = 1 if padding == "same" else tuple(int(s) for s in rng.integers(1, 3, size=2))
    c_in, c_out, r = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(0, 5))
    hw = tuple(int(d * (k - 1) + rng.integers(1, 5)) for d, k in zip(dilation, kernel, strict=True))
    lora_alpha = [0, 1, 8, 32.0][rng.integers(4)]
    dropout = [0.0, 0.0, 0.25][rng.integers(3)]
    shape = (int(rng.integers(1, 4)), c_in, *hw)
    return seed, c_in, c_out, kernel, stride, padding, dilation, bool(rng.integers(2)), r, lora_alpha, dropout, shape


LIVE_CASES = CORNERS + [random_case(seed) for seed in range(100, 116)]


def run_both(case: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Output, input gradient, triplet gradients and delta weight, by name: (ours, peft's through autograd)."""
    torch, _ = require_peft()
    seed, c_in, c_out, kernel, stride, padding, dilation, bias, r, alpha, p, shape = case
    torch.manual_seed(seed)
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "bias": bias}
    peft_layer = peft_conv(c_in, c_out, kernel, r=r, lora_alpha=alpha, dropout=p, **conv)
    ours = ours_from_peft(peft_layer, alpha)

    gen = np.random.default_rng(seed)
    x_np = gen.normal(size=shape)
    x = torch.tensor(x_np, requires_grad=True)
    mask = None
    peft_layer.train()
    if p > 0:
        torch.manual_seed(1000 + seed)
        mask = t2n(torch.nn.functional.dropout(torch.ones_like(x), p, training=True))
        torch.manual_seed(1000 + seed)  # peft's dropout draws the same mask again
    y = peft_layer(x)
    g_np = gen.normal(size=tuple(y.shape))
    (y * torch.tensor(g_np)).sum().backward()

    y_ours, cache = ours.forward(x_np, mask)
    grad_x, grads = ours.backward(cache, g_np)
    pairs = {"output": (y_ours, t2n(y)), "grad x": (grad_x, t2n(x.grad))}
    for part in PARTS:
        pairs[part] = (getattr(grads, part), t2n(getattr(peft_layer, part)["default"].grad))
    pairs["delta weight"] = (ours.delta_weight(), t2n(peft_layer.get_delta_weight("default")))
    return pairs


@pytest.mark.peft
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("case", LIVE_CASES, ids=[f"case{c[0]}" for c in LIVE_CASES])
def test_svd_conv2d_matches_peft(case: tuple) -> None:
    for what, (ours, theirs) in run_both(case).items():
        assert_close(ours, theirs, REL, what)


@pytest.mark.peft
def test_merge_unmerge_and_safe_merge_match_peft() -> None:
    torch, _ = require_peft()
    torch.manual_seed(21)
    peft_layer = peft_conv(3, 4, (3, 2), r=3, lora_alpha=8, stride=(1, 2), padding=(2, 1), dilation=(2, 1))
    ours = ours_from_peft(peft_layer, 8)
    x_np = np.random.default_rng(21).normal(size=(2, 3, 7, 6))
    peft_layer.merge(safe_merge=True)
    ours.merge(safe_merge=True)
    assert peft_layer.merged and ours.merged
    assert_close(ours.weight, t2n(peft_layer.get_base_layer().weight), REL, "merged kernel")
    with torch.no_grad():
        y_peft = peft_layer(torch.tensor(x_np))
    assert_close(ours.forward(x_np)[0], t2n(y_peft), REL, "merged output")
    peft_layer.unmerge()
    ours.unmerge()
    assert_close(ours.weight, t2n(peft_layer.get_base_layer().weight), REL, "unmerged kernel")
    with torch.no_grad():
        peft_layer.lora_E["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        peft_layer.merge(safe_merge=True)
    ours.triplet.lora_E[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ours.merge(safe_merge=True)
    assert_close(ours.weight, t2n(peft_layer.get_base_layer().weight), REL, "kernel after a refused merge")


@pytest.mark.peft
def test_peft_crashes_on_groups_which_we_refuse() -> None:
    torch, _ = require_peft()
    peft_layer = peft_conv(4, 6, 3, r=3, lora_alpha=8, groups=2)
    with pytest.raises(RuntimeError, match=r"shape '\[6, 2, 3, 3\]' is invalid for input of size 216"):
        peft_layer(torch.zeros(1, 4, 5, 5, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        peft_layer.get_delta_weight("default")
    weight = t2n(peft_layer.get_base_layer().weight)  # (6, 2, 3, 3)
    triplet = SVDTriplet(*(t2n(getattr(peft_layer, k)["default"]) for k in PARTS))
    with pytest.raises(ValueError, match="groups = 2 is not supported"):
        SVDConv2d(weight, None, triplet, lora_alpha=8, groups=2)


@pytest.mark.peft
def test_peft_pads_the_adapter_with_zeros_whatever_the_padding_mode() -> None:
    """peft's quirk, why we model zero padding only: with padding_mode='reflect' the base convolution
    reflects but the adapter's conv2d call pads with zeros, so merging changes peft's output."""
    torch, _ = require_peft()
    torch.manual_seed(22)
    peft_layer = peft_conv(2, 3, 3, r=2, lora_alpha=8, padding=1, padding_mode="reflect")
    x = torch.tensor(np.random.default_rng(22).normal(size=(1, 2, 5, 5)))
    with torch.no_grad():
        y = peft_layer(x)
        adapter_part = y - peft_layer.get_base_layer()(x)
        zero_padded = torch.nn.functional.conv2d(x, peft_layer.get_delta_weight("default"), padding=1)
        peft_layer.merge()
        y_merged = peft_layer(x)
    assert_close(t2n(adapter_part), t2n(zero_padded), REL, "adapter part is zero-padded")
    assert float((y - y_merged).abs().max()) > 1e-3
