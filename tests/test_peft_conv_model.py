"""Live against peft 0.21.2: a small CNN with adapted conv and linear layers through a whole trajectory.

conv1 (3 -> 4 channels, 3x3, padding 1) and conv2 (4 -> 6, 2x3 kernel, stride 2, dilation (1, 2),
padding (1, 0)) are SVDConv2d, fc1 an SVDLinear after the flatten, head frozen; the same initial
parameters (copied out of peft), the same batches, AdamW, the orthogonal term on. Every step the
loss; at the end the rank pattern, every triplet and every trained bias. Then the checkpoints: peft
loads what we save and we load what peft saves, conv triplets resized to the rank pattern.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from adalora_ref._backend import get_backend
from adalora_ref.checkpoint import load_adapter, save_adapter
from adalora_ref.config import AdaLoraConfig
from adalora_ref.conv import BaseConv2d
from adalora_ref.layer import SVDTriplet
from adalora_ref.mlp import MLP, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

from .peft_live import require_peft, t2n
from .test_layer import assert_close

pytestmark = pytest.mark.peft
PARTS = ("lora_A", "lora_E", "lora_B")
CONVS = {
    "conv1": {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1},
    "conv2": {
        "in_channels": 4,
        "out_channels": 6,
        "kernel_size": (2, 3),
        "stride": 2,
        "dilation": (1, 2),
        "padding": (1, 0),
    },
}
IMAGE = (3, 7, 8)  # (C, H, W): conv1 keeps 7x8, conv2 gives 4x2, so fc1 sees 6 * 4 * 2 = 48 features
LINEARS = {"fc1": (48, 10), "head": (10, 2)}
TARGETS = ["conv1", "conv2", "fc1"]
SCHEDULE = {"init_r": 5, "target_r": 2, "tinit": 3, "tfinal": 6, "deltaT": 2, "total_step": 30}
N_STEPS = 36  # warm-up, budgeting with masking, the forced masking at 24, the final phase


def torch_cnn():
    torch, _ = require_peft()

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, kwargs in CONVS.items():
                self.add_module(name, torch.nn.Conv2d(**kwargs))
            for name, (n_in, n_out) in LINEARS.items():
                self.add_module(name, torch.nn.Linear(n_in, n_out))

        def forward(self, x, target):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            x = self.head(torch.relu(self.fc1(torch.flatten(x, 1))))
            return SimpleNamespace(loss=torch.nn.functional.mse_loss(x, target), logits=x)

    return Net().double()


def base_of(net) -> dict:
    """Our base layers holding the weights of `net` (a plain torch_cnn, or one inside peft)."""
    xp = get_backend("numpy")

    def unwrap(module):
        return module.get_base_layer() if hasattr(module, "get_base_layer") else module

    base: dict = {}
    for name, kwargs in CONVS.items():
        conv = unwrap(getattr(net, name))
        geometry = {k: kwargs[k] for k in ("stride", "padding", "dilation") if k in kwargs}
        base[name] = BaseConv2d(xp.asarray(t2n(conv.weight)), xp.asarray(t2n(conv.bias)), **geometry)
    for name in LINEARS:
        linear = unwrap(getattr(net, name))
        base[name] = BaseLinear(xp.asarray(t2n(linear.weight)), xp.asarray(t2n(linear.bias)))
    return base


def peft_and_ours(bias: str, seed: int):
    torch, peft = require_peft()
    torch.manual_seed(seed)
    kwargs = {"target_modules": TARGETS, "lora_alpha": 8, "orth_reg_weight": 0.5, "bias": bias, **SCHEDULE}
    peft_model = peft.get_peft_model(torch_cnn(), peft.AdaLoraConfig(**kwargs))
    inner = peft_model.base_model.model
    model = AdaLoraModel(base_of(inner), AdaLoraConfig(**kwargs))
    model.set_triplets(
        {n: SVDTriplet(*(t2n(getattr(getattr(inner, n), k)["default"]) for k in PARTS)) for n in TARGETS}
    )
    return peft_model, model


def batch(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(5, *IMAGE)), rng.normal(size=(5, 2))


@pytest.mark.parametrize("bias", ["none", "all"])
def test_cnn_trajectory_matches_peft(bias: str) -> None:
    torch, _ = require_peft()
    peft_model, model = peft_and_ours(bias, seed=11)
    inner = peft_model.base_model.model
    # float64 leaves ranknum trainable in peft: never give it to the optimizer
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad and "ranknum" not in n]
    assert sorted(model.base_trainables()) == sorted(
        n.removeprefix("base_model.model.") for n, _ in trainable if "lora_" not in n
    )
    peft_opt = torch.optim.AdamW([p for _, p in trainable], lr=0.03)
    net, opt, rng = MLP(model), AdamW(lr=0.03), np.random.default_rng(12)
    masked_steps = 0
    for step in range(1, N_STEPS + 1):
        x, target = batch(rng)
        out = peft_model.base_model(torch.tensor(x), torch.tensor(target))
        out.loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
        result = train_step(net, opt, x, target, step, mse_loss)
        theirs = float(out.loss.detach())
        assert abs(result.loss - theirs) <= 1e-9 * abs(theirs), f"loss at step {step}: {result.loss!r} vs {theirs!r}"
        masked_steps += bool(result.allocation is not None and result.allocation.masked)
    assert masked_steps >= 5  # the budgeting phase really masked (the check is not vacuous)
    pattern = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert model.config.rank_pattern == pattern
    assert sum(sum(keep) for keep in pattern.values()) == SCHEDULE["target_r"] * len(TARGETS)
    for n, t in model.triplets().items():
        for part in PARTS:
            assert_close(getattr(t, part), t2n(getattr(getattr(inner, n), part)["default"]), 1e-8, f"{n}.{part}")
    named = dict(peft_model.named_parameters())
    for key, value in model.base_params().items():
        assert_close(value, t2n(named[f"base_model.model.{key}"]), 1e-8, key)
    if bias == "all":
        assert {"conv1.base_layer.bias", "conv2.base_layer.bias", "head.bias"} <= set(model.base_params())


def test_cnn_checkpoints_both_ways(tmp_path: Path) -> None:
    """peft's saved CNN adapter (rank pattern, conv triplets resized) runs the same in ours, and back."""
    torch, peft = require_peft()
    peft_model, _ = peft_and_ours("none", seed=13)
    torch.manual_seed(13)
    base_state = torch_cnn().state_dict()  # the base weights peft_and_ours drew
    peft_opt = torch.optim.AdamW([p for n, p in peft_model.named_parameters() if "lora_" in n], lr=0.03)
    rng = np.random.default_rng(14)
    for step in range(1, SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):  # up to the final masking
        x, target = batch(rng)
        peft_model.base_model(torch.tensor(x), torch.tensor(target)).loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")

    def peft_outputs(directory: Path, x: np.ndarray) -> np.ndarray:
        fresh = torch_cnn()
        fresh.load_state_dict(base_state)
        loaded = peft.PeftModel.from_pretrained(fresh, directory).eval()
        with torch.no_grad():
            return t2n(loaded.base_model.model(torch.tensor(x), torch.zeros(len(x), 2, dtype=torch.float64)).logits)

    fresh = torch_cnn()
    fresh.load_state_dict(base_state)
    ours = load_adapter(tmp_path / "peft", base_of(fresh))
    ranks = {n: ours.adapted[n].r for n in TARGETS}
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(TARGETS)
    assert ours.adapted["conv2"].triplet.lora_A.shape == (ranks["conv2"], 4 * 2 * 3)
    x = np.random.default_rng(15).normal(size=(3, *IMAGE))
    assert_close(np.asarray(MLP(ours).forward(x)[0]), peft_outputs(tmp_path / "peft", x), 1e-12, "peft's file in ours")
    save_adapter(ours, tmp_path / "ours")
    assert_close(peft_outputs(tmp_path / "ours", x), np.asarray(MLP(ours).forward(x)[0]), 1e-12, "our file in peft")


def test_two_adapters_on_conv_layers_sum_as_in_peft() -> None:
    """An inference adapter beside the trained one on conv and linear layers: the forward sums both."""
    torch, peft = require_peft()
    peft_model, model = peft_and_ours("none", seed=16)
    other = {"target_modules": ["conv2", "fc1"], "init_r": 3, "target_r": 1, "total_step": 30, "lora_alpha": 16}
    other.update(inference_mode=True, init_lora_weights=False)  # random E: the adapter adds something
    peft_model.add_adapter("other", peft.AdaLoraConfig(**other))
    peft_model.base_model.set_adapter(["default", "other"])
    inner = peft_model.base_model.model
    with torch.no_grad():
        for n in TARGETS:
            getattr(inner, n).lora_E["default"].normal_()  # E starts at 0: make "default" count too
    model.add_adapter("other", AdaLoraConfig(**other))
    for adapter, names in (("default", TARGETS), ("other", ["conv2", "fc1"])):
        copied = {n: SVDTriplet(*(t2n(getattr(getattr(inner, n), k)[adapter]) for k in PARTS)) for n in names}
        model.set_triplets(copied, adapter)
    model.set_adapter(["default", "other"])
    x = np.random.default_rng(17).normal(size=(3, *IMAGE))
    with torch.no_grad():
        theirs = t2n(inner(torch.tensor(x), torch.zeros(3, 2, dtype=torch.float64)).logits)
    ours = np.asarray(MLP(model).forward(x)[0])
    assert_close(ours, theirs, 1e-12, "two adapters")
    model.set_adapter("default")
    assert np.max(np.abs(np.asarray(MLP(model).forward(x)[0]) - theirs)) > 1e-6  # "other" really took part
