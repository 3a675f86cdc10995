"""Live against peft 0.21.2: random SVDLinear layers and the orthogonal regularizer built in peft,
float64, give the same outputs and, through torch autograd, the same gradients to 1e-12 relative."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_ref._backend import get_backend
from adalora_ref.layer import SVDLinear, SVDTriplet
from adalora_ref.orth import orthogonal_regularizer

from .peft_live import LossModel, make_torch_stack, require_peft, t2n
from .test_layer import assert_close

pytestmark = pytest.mark.peft
REL = 1e-12


def peft_adapted(specs, *, init_r: int, lora_alpha: float, fan_in_fan_out: bool, dropout: float = 0.0):
    torch, peft = require_peft()
    root = make_torch_stack(specs, torch.float64)
    config = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=0,
        total_step=10,
        target_modules=[s[0] for s in specs],
        lora_alpha=lora_alpha,
        lora_dropout=dropout,
        fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False,
    )
    return peft.get_peft_model(root, config)


def ours_from_peft(peft_layer, name: str, fan_in_fan_out: bool, lora_alpha: float) -> SVDLinear:
    xp = get_backend("numpy")
    base = peft_layer.get_base_layer()
    triplet = SVDTriplet(*(t2n(getattr(peft_layer, k)["default"]) for k in ("lora_A", "lora_E", "lora_B")))
    bias = None if base.bias is None else t2n(base.bias)
    layer = SVDLinear(
        xp.asarray(t2n(base.weight)),
        bias,
        triplet,
        lora_alpha=lora_alpha,
        fan_in_fan_out=fan_in_fan_out,
        name=name,
    )
    assert float(layer.ranknum[0]) == float(peft_layer.ranknum["default"].detach())
    assert layer.scaling == peft_layer.scaling["default"]
    return layer


CASES = [
    # (seed, in, out, r, fan_in_fan_out, bias, lora_alpha, input leading dims, dropout p)
    (0, 7, 5, 3, False, True, 8, (4,), 0.0),
    (1, 16, 9, 8, True, True, 32, (2, 3), 0.0),
    (2, 5, 11, 1, False, False, 0, (), 0.0),
    (3, 6, 6, 4, True, True, 0, (2, 2, 3), 0.0),
    (4, 12, 3, 0, False, True, 8, (5,), 0.0),
    (5, 9, 13, 6, False, True, 16.0, (3, 4), 0.25),
    (6, 4, 8, 2, True, True, 8, (6,), 0.5),
    (7, 33, 17, 12, False, False, 12, (2, 1, 2, 3), 0.1),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_svd_linear_matches_peft(case) -> None:
    torch, _ = require_peft()
    seed, n_in, n_out, r, fan, bias, alpha, lead, p = case
    torch.manual_seed(seed)
    model = peft_adapted([("proj", n_in, n_out, bias, fan)], init_r=r, lora_alpha=alpha, fan_in_fan_out=fan, dropout=p)
    peft_layer = model.base_model.model.proj
    ours = ours_from_peft(peft_layer, "proj", fan, alpha)

    gen = np.random.default_rng(seed)
    x_np = gen.normal(size=(*lead, n_in))
    g_np = gen.normal(size=(*lead, n_out))
    x = torch.tensor(x_np, requires_grad=True)
    mask = None
    model.train()
    if p > 0:
        torch.manual_seed(1000 + seed)
        mask = t2n(torch.nn.functional.dropout(torch.ones_like(x), p, training=True))
        torch.manual_seed(1000 + seed)  # peft's dropout draws the same mask again
    y = peft_layer(x)
    (y * torch.tensor(g_np)).sum().backward()

    y_ours, cache = ours.forward(x_np, mask)
    grad_x, grads = ours.backward(cache, g_np)
    assert_close(y_ours, t2n(y), REL, "output")
    assert_close(grad_x, t2n(x.grad), REL, "grad x")
    for part in ("lora_A", "lora_E", "lora_B"):
        assert_close(getattr(grads, part), t2n(getattr(peft_layer, part)["default"].grad), REL, part)
    assert_close(ours.delta_weight(), t2n(peft_layer.get_delta_weight("default")), REL, "delta weight")


def test_merge_and_safe_merge_match_peft() -> None:
    torch, _ = require_peft()
    torch.manual_seed(11)
    for fan in (False, True):
        model = peft_adapted([("proj", 6, 4, True, fan)], init_r=3, lora_alpha=8, fan_in_fan_out=fan)
        peft_layer = model.base_model.model.proj
        ours = ours_from_peft(peft_layer, "proj", fan, 8)
        peft_layer.merge(safe_merge=True)
        ours.merge(safe_merge=True)
        assert_close(ours.weight, t2n(peft_layer.get_base_layer().weight), REL, "merged weight")
        peft_layer.unmerge()
        ours.unmerge()
        assert_close(ours.weight, t2n(peft_layer.get_base_layer().weight), REL, "unmerged weight")
        with torch.no_grad():
            peft_layer.lora_E["default"][0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaNs detected"):
            peft_layer.merge(safe_merge=True)
        ours.triplet.lora_E[0, 0] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            ours.merge(safe_merge=True)


SPECS = [
    ("q", 6, 6, True, False),
    ("v", 6, 10, False, False),
    ("fc", 10, 3, True, False),
    ("none_r", 4, 4, True, False),
]


@pytest.mark.parametrize("init_r", [0, 1, 4])
@pytest.mark.parametrize("orth_reg_weight", [0.5, 0.1, 0.0])
def test_orthogonal_regularizer_matches_peft(init_r: int, orth_reg_weight: float) -> None:
    """peft adds the term in AdaLoraModel.forward when the output has a .loss: the model here
    returns a loss of exactly 0 so the gradients are the regularizer's alone."""
    torch, peft = require_peft()
    torch.manual_seed(init_r)
    root = make_torch_stack(SPECS, torch.float64)
    inner = LossModel.wrap(root, lambda m, x: (m.q(x) * 0.0).sum())
    config = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=0,
        total_step=10,
        target_modules=["q", "v", "fc"],
        init_lora_weights=False,
        orth_reg_weight=orth_reg_weight,
    )
    model = peft.get_peft_model(inner, config)
    layers = [model.base_model.model.inner.get_submodule(n) for n in ("q", "v", "fc")]
    # peft's forward goes through base_model: PeftModel without a task type would skip the term.
    loss = model.base_model(torch.zeros(2, 6, dtype=torch.float64)).loss
    loss.backward()

    triplets = [SVDTriplet(*(t2n(getattr(L, k)["default"]) for k in ("lora_A", "lora_E", "lora_B"))) for L in layers]
    value, grads = orthogonal_regularizer(triplets, orth_reg_weight)
    assert_close(float(value), float(loss), REL, "regularizer value")
    for L, (g_A, g_B) in zip(layers, grads, strict=True):
        assert_close(g_A, t2n(L.lora_A["default"].grad), REL, "dR/dA")
        assert_close(g_B, t2n(L.lora_B["default"].grad), REL, "dR/dB")


def test_orthogonal_regularizer_zero_norm_gradient_matches_torch() -> None:
    """An A with orthonormal rows makes ||A A^T - I|| exactly 0: torch's autograd gives a zero
    gradient there (no NaN), and so do we."""
    torch, _ = require_peft()
    A = torch.zeros(2, 4, dtype=torch.float64)
    A[0, 1] = 1.0
    A[1, 3] = 1.0
    A.requires_grad_(True)
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    eye = torch.eye(2, dtype=torch.float64)
    loss = 0.5 * (torch.norm(A @ A.T - eye, p="fro") + torch.norm(B.T @ B - eye, p="fro")) / 2
    loss.backward()
    assert float(loss) == 0.0
    trip = SVDTriplet(t2n(A), np.ones((2, 1)), t2n(B))
    value, [(g_A, g_B)] = orthogonal_regularizer([trip], 0.5)
    assert float(value) == 0.0
    np.testing.assert_array_equal(g_A, t2n(A.grad))
    np.testing.assert_array_equal(g_B, t2n(B.grad))
    assert not np.any(np.isnan(g_A))
