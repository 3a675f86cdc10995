"""Live against peft 0.21.2: the same MLP trained with AdaLoRA through all three phases.

Three targeted layers of different shapes and one untargeted layer, the same initial parameters
(copied out of peft), the same batches, AdamW, orthogonal term on (peft adds it through
`peft_model.base_model(...)`, whose output has a `.loss`). Every step: the loss, the budget, the
masks of E and the rank pattern; at the end every parameter.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from adalora_ref._backend import get_backend
from adalora_ref.config import AdaLoraConfig
from adalora_ref.layer import SVDTriplet
from adalora_ref.mlp import MLP, cross_entropy_loss, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

from .peft_live import require_peft, t2n
from .test_layer import assert_close

pytestmark = pytest.mark.peft

LAYERS = [("fc1", 8, 16), ("fc2", 16, 12), ("fc3", 12, 10), ("head", 10, 4)]
TARGETS = ["fc1", "fc2", "fc3"]
SCHEDULE = {"init_r": 6, "target_r": 3, "tinit": 5, "tfinal": 10, "deltaT": 3, "total_step": 60}
N_STEPS = 66  # warm-up 1..5, budgeting 6..49 (masking every 3rd), forced masking at 50, final phase 51..66


def torch_mlp(loss_name: str):
    torch, _ = require_peft()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, n_in, n_out in LAYERS:
                self.add_module(name, torch.nn.Linear(n_in, n_out))

        def forward(self, x, target):
            for i, (name, _, _) in enumerate(LAYERS):
                x = getattr(self, name)(x)
                if i < len(LAYERS) - 1:
                    x = torch.relu(x)
            if loss_name == "mse":
                loss = torch.nn.functional.mse_loss(x, target)
            else:
                loss = torch.nn.functional.cross_entropy(x, target)
            return SimpleNamespace(loss=loss, logits=x)

    return Net()


def run_both(dtype_name: str, loss_name: str, seed: int = 0):
    """Train peft and the reference side by side; yield per-step records of both."""
    torch, peft = require_peft()
    torch_dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    net = torch_mlp(loss_name).to(torch_dtype)
    peft_config = peft.AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, orth_reg_weight=0.5, **SCHEDULE)
    peft_model = peft.get_peft_model(net, peft_config)
    inner = peft_model.base_model.model
    # Only the lora tensors: in float64 peft leaves ranknum trainable (see the semantics note).
    lora_params = [p for n, p in peft_model.named_parameters() if any(k in n for k in ("lora_A", "lora_B", "lora_E"))]
    peft_opt = torch.optim.AdamW(lora_params, lr=0.02)

    xp = get_backend("numpy")
    base = {}
    for name, _, _ in LAYERS:
        module = getattr(inner, name)
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        base[name] = BaseLinear(
            xp.asarray(t2n(layer.weight).astype(dtype_name)), xp.asarray(t2n(layer.bias).astype(dtype_name))
        )
    config = AdaLoraConfig(target_modules=TARGETS, lora_alpha=8, orth_reg_weight=0.5, **SCHEDULE)
    model = AdaLoraModel(base, config)
    model.set_triplets(
        {
            n: SVDTriplet(
                *(
                    t2n(getattr(getattr(inner, n), k)["default"]).astype(dtype_name)
                    for k in ("lora_A", "lora_E", "lora_B")
                )
            )
            for n in TARGETS
        }
    )
    net_ours = MLP(model)
    opt = AdamW(lr=0.02)

    rng = np.random.default_rng(seed)
    loss_fn = mse_loss if loss_name == "mse" else cross_entropy_loss
    for step in range(1, N_STEPS + 1):
        x = rng.normal(size=(16, 8)).astype(dtype_name)
        if loss_name == "mse":
            target = rng.normal(size=(16, 4)).astype(dtype_name)
            t_target = torch.tensor(target)
        else:
            target = rng.integers(0, 4, size=16)
            t_target = torch.tensor(target)
        out = peft_model.base_model(torch.tensor(x), t_target)
        out.loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
        peft_budget = peft_model.base_model.rankallocator.budget_schedule(step)[0]

        result = train_step(net_ours, opt, xp.asarray(x), xp.asarray(target), step, loss_fn)
        yield SimpleNamespace(
            step=step,
            peft_loss=float(out.loss.detach()),
            loss=result.loss,
            peft_budget=peft_budget,
            allocation=result.allocation,
            peft_E={n: t2n(getattr(inner, n).lora_E["default"]) for n in TARGETS},
            E={n: np.asarray(model.adapted[n].triplet.lora_E, dtype=np.float64) for n in TARGETS},
            peft_pattern=peft_config.rank_pattern,
            pattern=config.rank_pattern,
            peft_params={
                f"{n}.{k}": t2n(getattr(getattr(inner, n), k)["default"])
                for n in TARGETS
                for k in ("lora_A", "lora_E", "lora_B")
            },
            params={
                f"{n}.{k}": np.asarray(getattr(model.adapted[n].triplet, k))
                for n in TARGETS
                for k in ("lora_A", "lora_E", "lora_B")
            },
        )


def strip_adapter(pattern):
    return None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}


@pytest.mark.parametrize(
    ("dtype_name", "loss_name", "loss_rtol", "param_rtol"),
    [
        ("float64", "mse", 1e-9, 1e-8),
        ("float64", "cross_entropy", 1e-9, 1e-8),
        # float32: both sides round every operation to 2**-24 ~ 6e-8 relative, in different orders
        # (BLAS blocking, reduction trees); measured over 66 AdamW steps: loss 3e-7, parameters 2.4e-6.
        ("float32", "mse", 3e-6, 3e-5),
    ],
)
def test_trajectory_matches_peft(dtype_name: str, loss_name: str, loss_rtol: float, param_rtol: float) -> None:
    masked_steps, phases = 0, set()
    record = None
    for record in run_both(dtype_name, loss_name):
        step = record.step
        assert abs(record.loss - record.peft_loss) <= loss_rtol * abs(record.peft_loss), (
            f"loss at step {step}: {record.loss!r} vs peft {record.peft_loss!r}"
        )
        if record.allocation is not None:
            assert record.allocation.budget == record.peft_budget, f"budget at step {step}"
            masked_steps += record.allocation.masked
            phases.add("warm-up" if step <= SCHEDULE["tinit"] else "budgeting")
        else:
            phases.add("final")
        for n in TARGETS:
            np.testing.assert_array_equal(
                record.E[n] == 0, record.peft_E[n] == 0, err_msg=f"E mask of {n} at step {step}"
            )
        assert record.pattern == strip_adapter(record.peft_pattern), f"rank pattern at step {step}"
    assert record is not None
    assert phases == {"warm-up", "budgeting", "final"}
    assert masked_steps >= 10
    for key, value in record.peft_params.items():
        assert_close(record.params[key], value, param_rtol, f"final {key}")
