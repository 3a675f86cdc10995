"""A training step is all or nothing: a NaN or Inf batch, loss or gradient is refused before any
parameter moves, and the model, AdamW and the allocator are exactly as before, so that training
goes on as if the bad batch never came (the bug: AdamW wrote NaN into the adapters first)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from adalora_ref.config import AdaLoraConfig
from adalora_ref.mlp import MLP, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import NonFiniteStepError, train_step

SHAPES = [("fc1", 6, 10), ("fc2", 10, 10), ("head", 10, 3)]
CONFIG = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 14}


def make_net(bias: str = "none") -> tuple[MLP, AdamW]:
    rng = np.random.default_rng(0)
    layers = {n: BaseLinear(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o)) for n, i, o in SHAPES}
    config = AdaLoraConfig(target_modules=["fc1", "fc2"], bias=bias, **CONFIG)
    return MLP(AdaLoraModel(layers, config, np.random.default_rng(1))), AdamW(lr=0.05)


def batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [(rng.normal(size=(5, 6)), rng.normal(size=(5, 3))) for _ in range(n)]


def state(net: MLP, optimizer: AdamW) -> dict[str, object]:
    """Everything a step may change, as copies: parameters, AdamW's moments, importance, rank pattern."""
    model = net.model
    out: dict[str, object] = {
        f"{n}.{p}": np.array(getattr(t, p)) for n, t in model.triplets().items() for p in ("lora_A", "lora_E", "lora_B")
    }
    out.update({k: np.array(v) for k, v in model.base_params().items()})
    for name, m in optimizer.state.items():
        out[f"adamw.{name}"] = (m.step, np.array(m.exp_avg), np.array(m.exp_avg_sq))
    for layer, parts in model.allocator.state.items():
        for part, s in parts.items():
            out[f"ipt.{layer}.{part}"] = (np.array(s.ipt), np.array(s.exp_avg_ipt), np.array(s.exp_avg_unc))
    out["last_step"] = model.allocator.last_step
    out["rank_pattern"] = copy.deepcopy(model.config.rank_pattern)
    return out


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        left, right = a[key], b[key]
        pairs = zip(left, right, strict=True) if isinstance(left, tuple) else [(left, right)]
        for x, y in pairs:
            assert np.array_equal(np.asarray(x), np.asarray(y)) if isinstance(x, np.ndarray) else x == y, key


def poisoned(array: np.ndarray, value: float) -> np.ndarray:
    out = array.copy()
    out[1, 2] = value
    return out


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("bias", ["none", "all"])
@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        ("x", np.nan, "the batch's x holds NaN or Inf"),
        ("target", np.nan, "the batch's target holds NaN or Inf"),
        ("x", np.inf, "the batch's x holds NaN or Inf"),
        ("x", 1e300, "the loss is inf (the batch is finite)"),
    ],
)
def test_a_bad_batch_is_refused_and_training_goes_on_as_if_it_never_came(
    where: str, value: float, named: str, bias: str
) -> None:
    net, optimizer = make_net(bias)
    twin, twin_optimizer = make_net(bias)
    clean = batches(12)
    bad_at = 7  # after masking has begun (tinit = 2, deltaT = 2): importance and a rank pattern exist
    for step, (x, target) in enumerate(clean, start=1):
        if step == bad_at:
            before = state(net, optimizer)
            bad = {"x": x, "target": target}
            bad[where] = poisoned(bad[where], value)
            with pytest.raises(NonFiniteStepError, match=re.escape(f"step {step} refused, nothing changed: {named}")):
                train_step(net, optimizer, bad["x"], bad["target"], step, mse_loss)
            assert_same(state(net, optimizer), before)
        ours = train_step(net, optimizer, x, target, step, mse_loss)
        theirs = train_step(twin, twin_optimizer, x, target, step, mse_loss)
        assert ours.loss == theirs.loss, f"step {step}: training after the refused batch differs"
    assert_same(state(net, optimizer), state(twin, twin_optimizer))


def test_a_non_finite_gradient_with_a_finite_loss_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient that overflows on its own (here: made NaN in the backward pass) is named by tensor."""
    net, optimizer = make_net()
    x, target = batches(1)[0]
    real_backward = MLP.backward

    def backward_with_nan(self, cache, grad_y):
        grads = real_backward(self, cache, grad_y)
        g = grads.triplets["fc2"]
        grads.triplets["fc2"] = type(g)(g.lora_A, g.lora_E, g.lora_B * np.nan)
        return grads

    monkeypatch.setattr(MLP, "backward", backward_with_nan)
    before = state(net, optimizer)
    with pytest.raises(NonFiniteStepError, match=r"the gradient of fc2\.lora_B holds NaN or Inf"):
        train_step(net, optimizer, x, target, 1, mse_loss)
    assert_same(state(net, optimizer), before)


def test_a_step_the_allocator_refuses_undoes_the_optimizer_step() -> None:
    """The allocator refuses a step number that goes backwards only after AdamW has run: undone."""
    net, optimizer = make_net()
    data = batches(6)
    for step, (x, target) in enumerate(data[:5], start=1):
        train_step(net, optimizer, x, target, step, mse_loss)
    before = state(net, optimizer)
    with pytest.raises(ValueError, match="steps must not go backwards"):
        train_step(net, optimizer, *data[5], 3, mse_loss)
    assert_same(state(net, optimizer), before)
