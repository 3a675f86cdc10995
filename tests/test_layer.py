"""SVDLinear: forward against the dense formula, backward against finite differences, merging,
initialisation and bad input, on every backend."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adalora_ref.layer import SVDLinear, SVDTriplet, init_triplet

from .conftest import Backend

PARTS = ("lora_A", "lora_E", "lora_B")


def make_params(rng: np.random.Generator, r: int, n_in: int, n_out: int, fan_in_fan_out: bool, bias: bool):
    """Random float64 NumPy parameters of one layer, E non-zero so every path is exercised."""
    W = rng.normal(size=(n_in, n_out) if fan_in_fan_out else (n_out, n_in))
    return {
        "weight": W,
        "bias": rng.normal(size=(n_out,)) if bias else None,
        "lora_A": rng.normal(size=(r, n_in)),
        "lora_E": rng.normal(size=(r, 1)),
        "lora_B": rng.normal(size=(n_out, r)),
    }


def build(be: Backend, p: dict, *, lora_alpha: float = 8, fan_in_fan_out: bool = False) -> SVDLinear:
    triplet = SVDTriplet(*(be.asarray(p[k]) for k in PARTS))
    bias = None if p["bias"] is None else be.asarray(p["bias"])
    return SVDLinear(be.asarray(p["weight"]), bias, triplet, lora_alpha=lora_alpha, fan_in_fan_out=fan_in_fan_out)


def dense_reference(p: dict, x: np.ndarray, lora_alpha: float, fan_in_fan_out: bool, mask=None) -> np.ndarray:
    """The layer written as one dense formula in float64 NumPy: W' = W + B diag(E) A * s / (r + 1e-5)."""
    r = p["lora_A"].shape[0]
    scaling = lora_alpha if lora_alpha > 0 else float(r)
    W = p["weight"].T if fan_in_fan_out else p["weight"]  # (out, in)
    delta = p["lora_B"] @ np.diag(p["lora_E"][:, 0]) @ p["lora_A"] * scaling / (r + 1e-5)
    xd = x if mask is None else x * mask
    y = x @ W.T + xd @ delta.T
    return y if p["bias"] is None else y + p["bias"]


def assert_close(actual, expected, rtol: float, what: str = "") -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual - expected), initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


shapes = st.fixed_dictionaries(
    {
        "r": st.integers(0, 3),
        "n_in": st.integers(1, 4),
        "n_out": st.integers(1, 4),
        "lead": st.lists(st.integers(1, 3), min_size=0, max_size=3),
        "fan_in_fan_out": st.booleans(),
        "bias": st.booleans(),
        "lora_alpha": st.sampled_from([0, 1, 8, 32]),
        "dropout": st.booleans(),
        "seed": st.integers(0, 2**32 - 1),
    }
)
fixture_settings = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def draw_case(case: dict):
    rng = np.random.default_rng(case["seed"])
    p = make_params(rng, case["r"], case["n_in"], case["n_out"], case["fan_in_fan_out"], case["bias"])
    x = rng.normal(size=(*case["lead"], case["n_in"]))
    mask = (rng.random(x.shape) > 0.3) / 0.7 if case["dropout"] else None
    return p, x, mask


@given(case=shapes)
@fixture_settings
def test_forward_matches_dense_formula(xp: Backend, case: dict) -> None:
    p, x, mask = draw_case(case)
    layer = build(xp, p, lora_alpha=case["lora_alpha"], fan_in_fan_out=case["fan_in_fan_out"])
    y, _ = layer.forward(xp.asarray(x), None if mask is None else xp.asarray(mask))
    expected = dense_reference(p, x, case["lora_alpha"], case["fan_in_fan_out"], mask)
    assert_close(xp.to_numpy(y), expected, 100 * xp.rtol, "forward")


@given(case=shapes)
@fixture_settings
def test_backward_matches_central_differences(xp64: Backend, case: dict) -> None:
    """Every element of dL/dx, dL/dA, dL/dE, dL/dB against (L(p + h) - L(p - h)) / 2h, L = sum(y * G)."""
    be = xp64
    p, x, mask = draw_case(case)
    G = np.random.default_rng(case["seed"] + 1).normal(size=(*x.shape[:-1], case["n_out"]))
    kwargs = {"lora_alpha": case["lora_alpha"], "fan_in_fan_out": case["fan_in_fan_out"]}
    m = None if mask is None else be.asarray(mask)

    def loss(params: dict, inp: np.ndarray) -> float:
        y, _ = build(be, params, **kwargs).forward(be.asarray(inp), m)
        return float(np.sum(be.to_numpy(y) * G))

    layer = build(be, p, **kwargs)
    _, cache = layer.forward(be.asarray(x), m)
    grad_x, grads = layer.backward(cache, be.asarray(G))
    analytic = {"x": be.to_numpy(grad_x), **{k: be.to_numpy(getattr(grads, k)) for k in PARTS}}

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


def test_r_zero_adds_nothing(xp: Backend) -> None:
    rng = np.random.default_rng(0)
    p = make_params(rng, 0, 5, 3, False, True)
    layer = build(xp, p)
    x = rng.normal(size=(4, 5))
    y, cache = layer.forward(xp.asarray(x))
    assert_close(xp.to_numpy(y), x @ p["weight"].T + p["bias"], 100 * xp.rtol, "r = 0 forward")
    _, grads = layer.backward(cache, xp.asarray(np.ones((4, 3))))
    assert grads is not None
    assert tuple(grads.lora_A.shape) == (0, 5) and tuple(grads.lora_B.shape) == (3, 0)


def test_lora_alpha_zero_uses_r_as_scaling(xp: Backend) -> None:
    p = make_params(np.random.default_rng(1), 3, 4, 2, False, False)
    assert build(xp, p, lora_alpha=0).scaling == 3.0
    # peft: scaling is lora_alpha itself, never lora_alpha / r (a port mistake the seed makes).
    assert build(xp, p, lora_alpha=16).scaling == 16


def test_delta_weight_merge_unmerge(xp: Backend) -> None:
    rng = np.random.default_rng(2)
    for fan_in_fan_out in (False, True):
        p = make_params(rng, 3, 5, 4, fan_in_fan_out, True)
        layer = build(xp, p, fan_in_fan_out=fan_in_fan_out)
        x = xp.asarray(rng.normal(size=(6, 5)))
        y_unmerged, _ = layer.forward(x)
        dense = p["lora_B"] @ (p["lora_A"] * p["lora_E"]) * 8 / (3 + 1e-5)
        assert_close(xp.to_numpy(layer.delta_weight()), dense.T if fan_in_fan_out else dense, 10 * xp.rtol)
        layer.merge()
        assert layer.merged
        y_merged, cache = layer.forward(x)
        assert_close(xp.to_numpy(y_merged), xp.to_numpy(y_unmerged), 100 * xp.rtol, "merged forward")
        assert layer.backward(cache, xp.asarray(np.ones((6, 4))))[1] is None
        layer.unmerge()
        assert_close(xp.to_numpy(layer.weight), p["weight"], 10 * xp.rtol, "unmerged weight")


def test_merge_twice_and_unmerge_twice_warn(xp: Backend) -> None:
    layer = build(xp, make_params(np.random.default_rng(3), 2, 3, 3, False, False))
    with pytest.warns(UserWarning, match="already unmerged"):
        layer.unmerge()
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()


def test_safe_merge_refuses_non_finite_and_leaves_weight(xp: Backend) -> None:
    p = make_params(np.random.default_rng(4), 2, 3, 3, False, False)
    p["lora_A"][0, 0] = np.inf
    layer = build(xp, p)
    before = xp.to_numpy(layer.weight).copy()
    with pytest.raises(ValueError, match=r"layer: merged weight holds \d+ non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    np.testing.assert_array_equal(xp.to_numpy(layer.weight), before)


def test_disabled_adapters_run_base_only_and_unmerge(xp: Backend) -> None:
    rng = np.random.default_rng(5)
    p = make_params(rng, 2, 3, 4, False, True)
    layer = build(xp, p)
    x = rng.normal(size=(2, 3))
    layer.merge()
    layer.disable_adapters = True
    y, _ = layer.forward(xp.asarray(x))
    assert not layer.merged  # peft unmerges a merged layer when its adapters are disabled
    assert_close(xp.to_numpy(y), x @ p["weight"].T + p["bias"], 100 * xp.rtol, "disabled")


def test_init_as_peft(xp: Backend) -> None:
    rng = np.random.default_rng(6)
    t = init_triplet(rng, 64, 300, 200, xp=xp.xp, dtype=xp.dtype)
    A, E, B = (xp.to_numpy(getattr(t, k)) for k in PARTS)
    assert A.shape == (64, 300) and E.shape == (64, 1) and B.shape == (200, 64)
    assert np.all(E == 0.0)
    assert abs(A.std() - 0.02) < 0.001 and abs(B.std() - 0.02) < 0.001
    t = init_triplet(rng, 64, 300, 200, init_lora_weights=False, xp=xp.xp, dtype=xp.dtype)
    A, E, B = (xp.to_numpy(getattr(t, k)) for k in PARTS)
    assert abs(A.std() - 1.0) < 0.02 and abs(B.std() - 1.0) < 0.02 and np.all(E != 0.0)
    with pytest.raises(ValueError, match="r must be >= 0"):
        init_triplet(rng, -1, 3, 3)


def test_default_init_starts_equal_to_base(xp: Backend) -> None:
    rng = np.random.default_rng(7)
    W = rng.normal(size=(4, 3))
    layer = SVDLinear(xp.asarray(W), None, init_triplet(rng, 2, 3, 4, xp=xp.xp, dtype=xp.dtype), lora_alpha=8)
    x = rng.normal(size=(5, 3))
    y, _ = layer.forward(xp.asarray(x))
    assert_close(xp.to_numpy(y), x @ W.T, 10 * xp.rtol)


class TestBadInput:
    def layer(self, be: Backend) -> SVDLinear:
        return build(be, make_params(np.random.default_rng(8), 2, 3, 4, False, True))

    def test_wrong_input_width(self, xp: Backend) -> None:
        with pytest.raises(ValueError, match=r"input has shape \(2, 5\).*in_features = 3"):
            self.layer(xp).forward(xp.asarray(np.ones((2, 5))))

    def test_wrong_dropout_mask_shape(self, xp: Backend) -> None:
        with pytest.raises(ValueError, match=r"dropout_mask has shape \(3, 3\), expected \(2, 3\)"):
            self.layer(xp).forward(xp.asarray(np.ones((2, 3))), xp.asarray(np.ones((3, 3))))

    def test_wrong_grad_shape(self, xp: Backend) -> None:
        layer = self.layer(xp)
        _, cache = layer.forward(xp.asarray(np.ones((2, 3))))
        with pytest.raises(ValueError, match=r"grad_y has shape \(2, 3\), expected \(2, 4\)"):
            layer.backward(cache, xp.asarray(np.ones((2, 3))))

    def test_mixed_dtypes(self, xp: Backend) -> None:
        other = "float32" if xp.dtype_name == "float64" else "float64"
        x = Backend(xp.name, xp.xp, other).asarray(np.ones((2, 3)))
        with pytest.raises(TypeError, match="input has dtype"):
            self.layer(xp).forward(x)

    def test_triplet_shape_contradicts_weight(self, xp: Backend) -> None:
        p = make_params(np.random.default_rng(9), 2, 3, 4, False, False)
        p["lora_A"] = np.ones((2, 5))
        with pytest.raises(ValueError, match=r"layer\[default\].lora_A has shape \(2, 5\), expected \(2, 3\)"):
            build(xp, p)

    def test_mixed_backends(self, xp: Backend) -> None:
        other = np.ones((2, 3), dtype=xp.np_dtype)
        if xp.name == "numpy":
            import array_api_strict

            other = array_api_strict.asarray(other)
        with pytest.raises(TypeError, match="different libraries"):
            self.layer(xp).forward(other)


def test_no_warning_on_plain_forward(xp: Backend) -> None:
    layer = build(xp, make_params(np.random.default_rng(10), 2, 3, 4, False, True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.forward(xp.asarray(np.ones((2, 3))))
