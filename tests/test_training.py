"""The orthogonal regularizer, the MLP, AdamW and whole training steps on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_ref._backend import get_backend
from adalora_ref.config import AdaLoraConfig
from adalora_ref.layer import SVDTriplet, TripletGrads
from adalora_ref.mlp import MLP, cross_entropy_loss, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.orth import orthogonal_regularizer
from adalora_ref.training import train_step

from .conftest import Backend
from .peft_live import require_peft, t2n
from .test_layer import assert_close


def test_orthogonal_regularizer_against_dense_formula_and_differences(xp: Backend) -> None:
    rng = np.random.default_rng(0)
    mats = [(rng.normal(size=(3, 5)), rng.normal(size=(4, 3))), (rng.normal(size=(2, 4)), rng.normal(size=(6, 2)))]
    triplets = [SVDTriplet(xp.asarray(A), xp.asarray(np.ones((A.shape[0], 1))), xp.asarray(B)) for A, B in mats]

    def dense(ms) -> float:
        norms = [np.linalg.norm(A @ A.T - np.eye(len(A))) + np.linalg.norm(B.T @ B - np.eye(B.shape[1])) for A, B in ms]
        return 0.3 * sum(norms) / (2 * len(ms))

    value, grads = orthogonal_regularizer(triplets, 0.3)
    assert_close(xp.to_numpy(value), dense(mats), 10 * xp.rtol, "value")
    if xp.dtype_name == "float32":
        return  # finite differences need float64
    h = 1e-6
    for i, (A, B) in enumerate(mats):
        for which, M in ((0, A), (1, B)):
            numeric = np.zeros_like(M)
            for idx in np.ndindex(M.shape):
                plus, minus = [list(m) for m in mats], [list(m) for m in mats]
                plus[i][which] = M.copy()
                plus[i][which][idx] += h
                minus[i][which] = M.copy()
                minus[i][which][idx] -= h
                numeric[idx] = (dense(plus) - dense(minus)) / (2 * h)
            assert_close(xp.to_numpy(grads[i][which]), numeric, 1e-6, f"orth gradient {i} {which}")


def test_orth_reg_weight_negative_refused() -> None:
    with pytest.raises(ValueError, match="orth_reg_weight must be >= 0, got -1"):
        orthogonal_regularizer([], -1)


def small_run(be: Backend, loss: str, steps: int = 24) -> list[float]:
    """A short training run through all three phases on backend `be`; returns the losses."""
    rng = np.random.default_rng(1)
    shapes = [("fc1", 6, 10), ("fc2", 10, 8), ("out", 8, 3)]
    layers = {
        n: BaseLinear(be.asarray(rng.normal(size=(o, i)) / 3), be.asarray(rng.normal(size=o))) for n, i, o in shapes
    }
    config = AdaLoraConfig(
        target_modules=["fc1", "fc2"], init_r=4, target_r=2, tinit=3, tfinal=5, deltaT=2, total_step=20
    )
    model = AdaLoraModel(layers, config, np.random.default_rng(2))
    net, opt = MLP(model), AdamW(lr=0.05)
    losses = []
    for step in range(1, steps + 1):
        x = be.asarray(rng.normal(size=(8, 6)))
        if loss == "mse":
            target, fn = be.asarray(rng.normal(size=(8, 3))), mse_loss
        else:
            target, fn = be.xp.asarray(rng.integers(0, 3, size=8)), cross_entropy_loss
        losses.append(train_step(net, opt, x, target, step, fn).loss)
    assert config.rank_pattern is not None and all(sum(v) <= 4 for v in config.rank_pattern.values())
    return losses


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_training_runs_the_same_on_every_backend(xp: Backend, loss: str) -> None:
    reference = small_run(Backend("numpy", get_backend("numpy"), "float64"), loss)
    losses = small_run(xp, loss)
    # float32 runs may flip a near-tie in a mask; the losses must still track float64 closely
    assert_close(losses, reference, 1e-12 if xp.dtype_name == "float64" else 1e-3, "losses")


@pytest.mark.peft
def test_adamw_matches_torch() -> None:
    torch, _ = require_peft()
    rng = np.random.default_rng(3)
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    t_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    t_opt = torch.optim.AdamW(list(t_params.values()), lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    opt = AdamW(lr=0.03, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for step in range(12):
        grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
        if step == 5:
            grads["b"] = None  # skipped, as torch skips a parameter whose .grad is None
        for k, t in t_params.items():
            t.grad = None if grads[k] is None else torch.tensor(grads[k])
        t_opt.step()
        params = opt.step(params, grads)
        for k, t in t_params.items():
            assert_close(params[k], t2n(t), 1e-14, f"{k} at step {step}")


def test_adamw_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"betas\[1\] must be in \[0, 1\), got 1.5"):
        AdamW(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match=r"gradient of a has shape \(2,\), expected \(3,\)"):
        AdamW().step({"a": np.zeros(3)}, {"a": np.zeros(2)})
    with pytest.raises(ValueError, match=r"unknown parameters: \['z'\]"):
        AdamW().step({"a": np.zeros(3)}, {"z": np.zeros(3)})


def test_cross_entropy_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got range \[0, 3\]"):
        cross_entropy_loss(np.zeros((2, 3)), np.array([0, 3]))


def test_final_phase_steps_must_not_go_backwards() -> None:
    base = {n: BaseLinear(np.eye(4)) for n in ("a", "b")}
    m = AdaLoraModel(base, AdaLoraConfig(target_modules=["a", "b"], init_r=2, target_r=1, total_step=10))
    grads = {n: TripletGrads(np.ones((2, 4)), np.ones((2, 1)), np.ones((4, 2))) for n in ("a", "b")}
    for step in (1, 10):
        m.update_and_allocate(step, grads)
    m.update_and_allocate(12, None)
    with pytest.raises(ValueError, match="step 11 comes after step 12"):
        m.update_and_allocate(11, None)
