"""Live against peft 0.21.2: bias modes and modules_to_save through whole trajectories, and several
adapters (forward sums, one trainable, named checkpoints both ways)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adalora_ref._backend import get_backend
from adalora_ref.checkpoint import add_saved_adapter, load_adapter, save_adapter
from adalora_ref.config import AdaLoraConfig
from adalora_ref.layer import SVDTriplet
from adalora_ref.mlp import MLP, mse_loss
from adalora_ref.model import PEFT_ONE_TRAINABLE, AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

from .peft_live import require_peft, t2n
from .test_layer import assert_close
from .test_peft_trajectory import LAYERS, TARGETS, torch_mlp

pytestmark = pytest.mark.peft
PARTS = ("lora_A", "lora_E", "lora_B")
SCHEDULE = {"init_r": 5, "target_r": 2, "tinit": 3, "tfinal": 6, "deltaT": 2, "total_step": 30}


def peft_model_of(config_kwargs: dict, seed: int):
    torch, peft = require_peft()
    torch.manual_seed(seed)
    net = torch_mlp("mse").double()
    return peft.get_peft_model(net, peft.AdaLoraConfig(**config_kwargs))


def ours_like(peft_model, config: AdaLoraConfig) -> AdaLoraModel:
    """Our model with the same base weights and the same initial adapter parameters as `peft_model`."""
    xp = get_backend("numpy")
    inner = peft_model.base_model.model
    base = {}
    for name, _, _ in LAYERS:
        module = getattr(inner, name)
        layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if hasattr(module, "original_module"):  # a modules_to_save wrapper
            layer = module.original_module
        base[name] = BaseLinear(xp.asarray(t2n(layer.weight)), xp.asarray(t2n(layer.bias)))
    model = AdaLoraModel(base, config)
    copy_adapter(peft_model, model, "default")
    return model


def copy_adapter(peft_model, model: AdaLoraModel, adapter: str) -> None:
    inner = peft_model.base_model.model
    model.set_triplets(
        {n: SVDTriplet(*(t2n(getattr(getattr(inner, n), k)[adapter]) for k in PARTS)) for n in model.triplets(adapter)},
        adapter,
    )


def train_side_by_side(peft_model, peft_opt, model: AdaLoraModel, seed: int, steps: int = 34) -> None:
    """peft's training loop and train_step on the same batches; the losses must agree every step."""
    torch, _ = require_peft()
    net, opt, rng = MLP(model), AdamW(lr=0.03), np.random.default_rng(seed)
    for step in range(1, steps + 1):
        x, target = rng.normal(size=(12, 8)), rng.normal(size=(12, 4))
        out = peft_model.base_model(torch.tensor(x), torch.tensor(target))
        out.loss.backward()
        peft_opt.step()
        peft_model.base_model.update_and_allocate(step)
        peft_opt.zero_grad()
        theirs = float(out.loss.detach())
        ours = train_step(net, opt, x, target, step, mse_loss).loss
        assert abs(ours - theirs) <= 1e-9 * abs(theirs), f"loss at step {step}: {ours!r} vs peft {theirs!r}"


@pytest.mark.parametrize(
    ("bias", "modules_to_save"), [("none", None), ("all", None), ("lora_only", None), ("all", ["head"])]
)
def test_bias_modes_trajectory_matches_peft(bias: str, modules_to_save: list[str] | None) -> None:
    torch, _ = require_peft()
    kwargs = {"target_modules": TARGETS, "bias": bias, "modules_to_save": modules_to_save, **SCHEDULE}
    peft_model = peft_model_of(kwargs, seed=3)
    model = ours_like(peft_model, AdaLoraConfig(**kwargs))
    trainable = [
        (n, p) for n, p in peft_model.named_parameters() if p.requires_grad and "ranknum" not in n
    ]  # float64 leaves ranknum trainable: never give it to the optimizer
    peft_opt = torch.optim.AdamW([p for _, p in trainable], lr=0.03)
    peft_base_names = sorted(n.removeprefix("base_model.model.") for n, _ in trainable if "lora_" not in n)
    assert sorted(model.base_trainables()) == peft_base_names
    train_side_by_side(peft_model, peft_opt, model, seed=4)
    pattern = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert model.config.rank_pattern == pattern
    named = dict(peft_model.named_parameters())
    for key, value in model.base_params().items():
        assert_close(value, t2n(named[f"base_model.model.{key}"]), 1e-8, key)
    inner = peft_model.base_model.model
    for n, t in model.triplets().items():
        for part in PARTS:
            assert_close(getattr(t, part), t2n(getattr(getattr(inner, n), part)["default"]), 1e-8, f"{n}.{part}")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_checkpoints_round_trip_with_peft(bias: str, tmp_path: Path) -> None:
    """peft saves trained biases (and a modules_to_save copy); we load them and agree; peft loads what we save."""
    torch, peft = require_peft()
    kwargs = {"target_modules": TARGETS, "bias": bias, "modules_to_save": ["head"] if bias == "all" else None}
    peft_model = peft_model_of({**kwargs, **SCHEDULE}, seed=5)
    torch.manual_seed(5)
    base_state = torch_mlp("mse").double().state_dict()  # the base weights peft_model_of drew
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad and "ranknum" not in n:
                p.add_(torch.randn_like(p) * 0.1)  # move every trainable tensor away from its base value
    peft_model.save_pretrained(tmp_path / "peft")

    def peft_outputs(directory: Path, x: np.ndarray) -> np.ndarray:
        fresh = torch_mlp("mse").double()
        fresh.load_state_dict(base_state)
        loaded = peft.PeftModel.from_pretrained(fresh, directory).eval()
        with torch.no_grad():
            return t2n(loaded.base_model.model(torch.tensor(x), torch.zeros(len(x), 4, dtype=torch.float64)).logits)

    xp = get_backend("numpy")
    base = {
        n: BaseLinear(xp.asarray(t2n(base_state[f"{n}.weight"])), xp.asarray(t2n(base_state[f"{n}.bias"])))
        for n, _, _ in LAYERS
    }
    ours = load_adapter(tmp_path / "peft", base)
    x = np.random.default_rng(6).normal(size=(5, 8))
    assert_close(np.asarray(MLP(ours).forward(x)[0]), peft_outputs(tmp_path / "peft", x), 1e-12, "peft's file in ours")
    save_adapter(ours, tmp_path / "ours")
    assert_close(peft_outputs(tmp_path / "ours", x), np.asarray(MLP(ours).forward(x)[0]), 1e-12, "our file in peft")


def two_adapter_models(seed: int = 7):
    _, peft = require_peft()
    default = {"target_modules": TARGETS, "init_lora_weights": False, **SCHEDULE}
    other = {
        "target_modules": ["fc1", "fc3"],
        "init_r": 3,
        "target_r": 1,
        "total_step": 30,
        "inference_mode": True,
        "init_lora_weights": False,
        "lora_alpha": 16,
    }
    peft_model = peft_model_of(default, seed)
    peft_model.add_adapter("other", peft.AdaLoraConfig(**other))
    model = ours_like(peft_model, AdaLoraConfig(**default))
    model.add_adapter("other", AdaLoraConfig(**other))
    copy_adapter(peft_model, model, "other")
    return peft_model, model


def test_forward_sums_the_active_adapters() -> None:
    torch, _ = require_peft()
    peft_model, model = two_adapter_models()
    x = np.random.default_rng(8).normal(size=(6, 8))
    for active in (["default"], ["other"], ["default", "other"]):
        peft_model.base_model.set_adapter(active)
        model.set_adapter(active)
        with torch.no_grad():
            theirs = t2n(peft_model.base_model.model(torch.tensor(x), torch.zeros(6, 4, dtype=torch.float64)).logits)
        assert_close(np.asarray(MLP(model).forward(x)[0]), theirs, 1e-12, f"active {active}")


def test_a_second_trainable_adapter_is_refused_as_peft_refuses() -> None:
    _, peft = require_peft()
    peft_model, model = two_adapter_models()
    with pytest.raises(ValueError) as theirs:
        peft_model.add_adapter("third", peft.AdaLoraConfig(target_modules=["fc1"], total_step=10))
    with pytest.raises(ValueError) as ours:
        model.add_adapter("third", AdaLoraConfig(target_modules=["fc1"], total_step=10))
    assert str(ours.value) == str(theirs.value) == PEFT_ONE_TRAINABLE


def test_trajectory_with_an_active_inference_adapter() -> None:
    """Both adapters active in the forward; only the trainable one is optimized, scored and regularized."""
    torch, _ = require_peft()
    peft_model, model = two_adapter_models(seed=9)
    peft_model.base_model.set_adapter(["default", "other"])
    model.set_adapter(["default", "other"])
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n and n.endswith(".default")]
    peft_opt = torch.optim.AdamW(params, lr=0.03)
    train_side_by_side(peft_model, peft_opt, model, seed=10)
    pattern = {k.removesuffix(".default"): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert model.config.rank_pattern == pattern
    assert model.peft_config["other"].rank_pattern is None


def test_named_adapter_checkpoints_both_ways(tmp_path: Path) -> None:
    torch, _ = require_peft()
    peft_model, model = two_adapter_models(seed=11)
    x = np.random.default_rng(12).normal(size=(4, 8))
    # peft saves "other" in a subdirectory named after it; we add it to a model that lacks it
    peft_model.save_pretrained(tmp_path / "peft", selected_adapters=["default", "other"])
    fresh = ours_like(peft_model, AdaLoraConfig(target_modules=TARGETS, init_lora_weights=False, **SCHEDULE))
    add_saved_adapter(fresh, tmp_path / "peft" / "other", "other")
    fresh.set_adapter(["default", "other"])
    peft_model.base_model.set_adapter(["default", "other"])
    with torch.no_grad():
        theirs = t2n(peft_model.base_model.model(torch.tensor(x), torch.zeros(4, 4, dtype=torch.float64)).logits)
    assert_close(np.asarray(MLP(fresh).forward(x)[0]), theirs, 1e-12, "peft's saved 'other' in our model")
    # we save "other"; peft loads it under that name into a model that has only "default"
    save_adapter(model, tmp_path / "ours_other", "other")
    bare = peft_model_of({"target_modules": TARGETS, "init_lora_weights": False, **SCHEDULE}, seed=11)
    bare.load_adapter(str(tmp_path / "ours_other"), adapter_name="other")
    bare.base_model.set_adapter(["default", "other"])
    model.set_adapter(["default", "other"])
    with torch.no_grad():
        theirs = t2n(bare.base_model.model(torch.tensor(x), torch.zeros(4, 4, dtype=torch.float64)).logits)
    assert_close(np.asarray(MLP(model).forward(x)[0]), theirs, 1e-12, "our saved 'other' in peft")
