"""Live pins of the peft 0.21.2 behaviours the reference documents and decides differently."""

from __future__ import annotations

import numpy as np
import pytest

from adalora_ref.config import AdaLoraConfig
from adalora_ref.layer import TripletGrads
from adalora_ref.model import AdaLoraModel, BaseLinear

from .peft_live import require_peft

pytestmark = pytest.mark.peft


def two_layer_peft(init_r: int, target_r: int, dtype=None):
    torch, peft = require_peft()
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.a, net.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    if dtype is not None:
        net = net.to(dtype)
    config = peft.AdaLoraConfig(
        target_modules=["a", "b"], init_r=init_r, target_r=target_r, total_step=10, init_lora_weights=False
    )
    return peft.get_peft_model(net, config)


def ours(init_r: int, target_r: int) -> AdaLoraModel:
    base = {n: BaseLinear(np.eye(4)) for n in ("a", "b")}
    return AdaLoraModel(base, AdaLoraConfig(target_modules=["a", "b"], init_r=init_r, target_r=target_r, total_step=10))


def test_peft_keeps_rows_scored_nan_where_we_refuse() -> None:
    torch, _ = require_peft()
    model = two_layer_peft(3, 1)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.grad = torch.randn_like(p)
            p.grad[0] = float("nan")  # every tensor's first row: every triplet's first score is NaN
    model.base_model.update_and_allocate(1)
    pattern = model.peft_config["default"].rank_pattern
    assert pattern["a.lora_E.default"][0] and pattern["b.lora_E.default"][0]  # NaN rows: "kept"
    m = ours(3, 1)
    bad = {n: TripletGrads(np.full((3, 4), np.nan), np.ones((3, 1)), np.ones((4, 3))) for n in ("a", "b")}
    with pytest.raises(ValueError, match=r"a.lora_A gradient holds NaN or Inf"):
        m.update_and_allocate(1, bad)


def test_peft_crashes_at_k_zero_where_we_prune_nothing() -> None:
    """init_r == target_r, which peft's config accepts: kthvalue(k = 0) raises at the first masking."""
    torch, _ = require_peft()
    model = two_layer_peft(2, 2)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="selected number k out of range"):
        model.base_model.update_and_allocate(1)
    m = ours(2, 2)
    grads = {n: TripletGrads(np.ones((2, 4)), np.ones((2, 1)), np.ones((4, 2))) for n in ("a", "b")}
    allocation = m.update_and_allocate(1, grads)
    assert allocation is not None and allocation.rank_pattern == {"a": [True, True], "b": [True, True]}


def test_peft_leaves_ranknum_trainable_in_float64() -> None:
    """The trap the golden generator avoids: an optimizer over `requires_grad` parameters trains ranknum."""
    torch, _ = require_peft()
    trainable64 = [n for n, p in two_layer_peft(2, 1, torch.float64).named_parameters() if p.requires_grad]
    trainable32 = [n for n, p in two_layer_peft(2, 1).named_parameters() if p.requires_grad]
    assert any("ranknum" in n for n in trainable64)
    assert not any("ranknum" in n for n in trainable32)
