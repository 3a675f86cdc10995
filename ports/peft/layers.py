"""The one-computation kinds driven through the installed peft release: layer, conv_layer, init, orth,
schedule, config and targeting (docs/SPEC.md 14.1-14.5, 14.9, 14.10). Each `run_<kind>(case)` takes
a case's config and inputs (never its expected values) and returns {check key: output}."""

from __future__ import annotations

from typing import Any

import compat
import numpy as np
import torch
from compat import adalora
from gen.common import PARTS, TORCH_DTYPES, Stack, lora, t2n
from gen.config import saved_fields
from gen.schedule import record_schedule
from gen.targeting import peft_targets

from adalora_ref.conformance.case import Case

Outputs = dict[str, Any]


class ReplayDropout(torch.nn.Module):
    """Stands in for peft's lora_dropout: multiplies the input by the mask the case gives (torch's
    scaled mask, 0 or 1 / (1 - p)), which is what peft's dropout did when the case was made."""

    def __init__(self, mask: np.ndarray | None = None) -> None:
        super().__init__()
        self.mask = None if mask is None else torch.from_numpy(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "ReplayDropout used before a mask was set"
        return x * self.mask


def tensor_of(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value))


def set_(param: torch.Tensor, value: np.ndarray) -> None:
    """Copy a case input into a release's tensor (shape checked by torch)."""
    with torch.no_grad():
        param.copy_(tensor_of(value))


def scratch(case: Case) -> Case:
    """An empty copy of `case` for gen's record_* helpers to record into (no expected values)."""
    return Case(case.id, case.kind, case.dtype, "", case.config, {}, [], {})


def run_layer(case: Case) -> Outputs:
    """One SVDLinear (layer) or SVDConv2d (conv_layer): forward, backward, delta weight, merge, unmerge
    and, in the operation cases, disable / safe merge; or only a refused safe merge."""
    cfg, dtype = case.config, TORCH_DTYPES[case.dtype]
    if case.kind == "conv_layer":
        name, fan = "conv", False
        stack = Stack([("conv", 0, 0)], bias=cfg["bias"], convs={"conv": cfg["conv"]}).to(dtype)
        extra: dict[str, Any] = {}
    else:
        name, fan = "proj", cfg["fan_in_fan_out"]
        stack = Stack([("proj", cfg["in_features"], cfg["out_features"])], conv1d=fan, bias=cfg["bias"]).to(dtype)
        extra = {"fan_in_fan_out": fan}
    model = adalora(
        stack,
        target_modules=[name],
        init_r=cfg["r"],
        target_r=0,
        total_step=10,
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        init_lora_weights=False,
        **extra,
    )
    layer = getattr(model.base_model.model, name)
    base = compat.base_layer(layer)
    set_(base.weight, case.inputs["weight"])
    if "bias" in case.inputs:
        set_(base.bias, case.inputs["bias"])
    for part in PARTS:
        set_(lora(layer, part), case.inputs[part])
    out: Outputs = {}
    if cfg.get("safe_merge_only"):
        try:
            layer.merge(safe_merge=True)
            out["safe_merge_refused"] = False
        except ValueError:
            out["safe_merge_refused"] = True
        out["merged"] = bool(layer.merged)
        out["weight_after_refused_merge"] = t2n(base.weight)
        return out
    if "dropout_mask" in case.inputs:
        layer.lora_dropout["default"] = ReplayDropout(case.inputs["dropout_mask"])
    x = tensor_of(case.inputs["x"]).requires_grad_(True)
    model.train()
    y = layer(x)
    y.backward(tensor_of(case.inputs["grad_y"]))
    out["scaling"] = layer.scaling["default"]
    out["ranknum"] = float(layer.ranknum["default"].detach())
    out["y"], out["grad_x"] = t2n(y), t2n(x.grad)
    for part in PARTS:
        out[f"grad_{part}"] = t2n(compat.grad_of(lora(layer, part)))
    with torch.no_grad():
        out["delta_weight"] = t2n(compat.delta_weight(layer))
        layer.merge()
        out["merged_weight"] = t2n(base.weight)
        layer.unmerge()
        out["unmerged_weight"] = t2n(base.weight)
        if case.id.split("/")[1].startswith("disable_and_safe_merge"):
            with model.disable_adapter():  # every adapter layer disabled: here the one layer
                out["y_disabled"] = t2n(layer(x))
            layer.merge(safe_merge=True)
            out["safe_merged_weight"] = t2n(base.weight)
            out["y_merged"] = t2n(layer(x))
    return out


def run_init(case: Case) -> Outputs:
    """A fresh triplet drawn by the release under the case's torch seed: E, and the mean and std of
    every part (the case checks those it has)."""
    cfg = case.config
    torch.manual_seed(cfg["seed"])
    model = adalora(
        Stack([("proj", cfg["in_features"], cfg["out_features"])]),
        target_modules=["proj"],
        init_r=cfg["r"],
        target_r=0,
        total_step=10,
        init_lora_weights=cfg["init_lora_weights"],
    )
    layer = model.base_model.model.proj
    out: Outputs = {}
    for part in PARTS:
        values = t2n(lora(layer, part))
        out[part] = values
        wide = values.astype(np.float64)
        if wide.size:
            out[f"std.{part}"] = np.asarray(wide.std(), dtype=np.float32)
            out[f"mean.{part}"] = np.asarray(wide.mean(), dtype=np.float32)
    return out


def run_orth(case: Case) -> Outputs:
    """The orthogonal term as the release's AdaLoraModel.forward adds it (the task loss is 0), and
    its gradients."""
    cfg, dtype = case.config, TORCH_DTYPES[case.dtype]
    layers = [(n, i, o) for n, _, i, o in cfg["layers"]]
    model = adalora(
        Stack(layers).to(dtype),
        target_modules=[n for n, _, _ in layers],
        init_r=cfg["layers"][0][1],
        target_r=0,
        total_step=10,
        init_lora_weights=False,
        orth_reg_weight=cfg["orth_reg_weight"],
    )
    inner = model.base_model.model
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            set_(lora(getattr(inner, n), part), case.inputs[f"{n}.{part}"])
    loss = model.base_model(torch.zeros(2, layers[0][1], dtype=dtype)).loss
    loss.backward()
    out: Outputs = {"value": t2n(loss)}
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            out[f"grad.{n}.{part}"] = t2n(compat.grad_of(lora(getattr(inner, n), part)))
    return out


def run_schedule(case: Case) -> Outputs:
    """The release's RankAllocator.budget_schedule at the case's steps (golden/gen/schedule.py)."""
    c = scratch(case)
    record_schedule(c, build=adalora)
    return c.expected


def run_config(case: Case) -> Outputs:
    """Whether the release accepts each config and what it saves. A keyword the release's
    AdaLoraConfig does not have (TypeError) is a refusal, as a ValueError is."""
    out: Outputs = {}
    for i, entry in enumerate(case.config["entries"]):
        saved, error = saved_fields(entry["kwargs"], entry["compare_fields"], refusals=(ValueError, TypeError))
        out[f"entry{i}.valid"] = error is None
        if saved is not None:
            out[f"entry{i}.adapter_config"] = saved
    return out


def run_targeting(case: Case) -> Outputs:
    """The modules the release adapts for each entry (golden/gen/targeting.py)."""
    modules = case.config["modules"]
    return {f"entry{i}.targeted": peft_targets(e["kwargs"], modules)[0] for i, e in enumerate(case.config["entries"])}
