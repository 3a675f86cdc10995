"""The kinds with steps or saved state, driven through the installed peft release: allocator,
trajectory and checkpoint (docs/SPEC.md 14.6-14.8, call order 16.2). Each `run_<kind>(case)` takes
the case's config, inputs and files (never its expected values) and returns {check key: output}.

The recording (importance state, scores and threshold from torch.kthvalue, parameters after the
optimizer step) is golden/gen's own, so a port run records exactly what the generator recorded."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import compat
import peft
import torch
from compat import adalora
from gen.allocator import capture_kthvalue, record_importance, record_scores
from gen.common import PARTS, TORCH_DTYPES, Stack, lora, t2n
from gen.trajectory import peft_step, record_after_optimizer
from layers import Outputs, ReplayDropout, scratch, set_, tensor_of

from adalora_ref.conformance.case import Case


def case_name(release_name: str, case_names: set[str]) -> str:
    """A base parameter's name as the case spells it (peft 0.21.2: `fc1.base_layer.bias`) for the
    release's name of the same parameter (before 0.7 the SVD layer holds it: `fc1.bias`)."""
    plain = release_name.replace(".base_layer.", ".")
    return next((n for n in case_names if n.replace(".base_layer.", ".") == plain), release_name)


def masked_scores(c: Case, step: int, captured: list, ranks: list[tuple[str, int]]) -> None:
    """The scores and threshold the release handed to torch.kthvalue at a masking step (none recorded
    when it did not call it exactly once: the checks then say they are missing)."""
    if len(captured) == 1:
        record_scores(c, step, captured, ranks)


def rank_pattern_of(model: Any, name: str) -> Any:
    pattern = model.peft_config["default"].rank_pattern
    return None if pattern is None else pattern.get(f"{name}.lora_E.default")


def run_allocator(case: Case) -> Outputs:
    """update_and_allocate(s) on the parameters and gradients the case gives at each step (14.6)."""
    cfg, dtype = case.config, TORCH_DTYPES[case.dtype]
    hyper = {k: cfg[k] for k in ("target_r", "tinit", "tfinal", "total_step", "deltaT", "beta1", "beta2")}
    stack = torch.nn.Module()
    for name, _, n_in, n_out in cfg["layers"]:
        stack.add_module(name, torch.nn.Linear(n_in, n_out).to(dtype))
    model = adalora(stack, target_modules=[n for n, *_ in cfg["layers"]], init_r=cfg["init_r"], **hyper)
    inner = model.base_model.model
    for name, r, _, _ in cfg["layers"]:
        if r != cfg["init_r"]:  # a layer of another rank, rebuilt by the release's update_layer
            compat.update_layer(getattr(inner, name), r, 8, model.peft_config["default"])
    allocator = model.base_model.rankallocator
    allocator._set_budget_scheduler(inner)
    c = scratch(case)
    names = [n for n, *_ in cfg["layers"]]
    final_step = cfg["total_step"] - cfg["tfinal"]
    first = cfg.get("first_step", 1)
    for step in range(first, first + cfg["n_steps"]):
        for name in names:
            for part in PARTS:
                p = lora(getattr(inner, name), part)
                set_(p, case.inputs[f"step{step}.{name}.{part}"])
                p.grad = tensor_of(case.inputs[f"step{step}.{name}.{part}.grad"]).clone()
        captured: list = []
        with capture_kthvalue(captured):
            model.base_model.update_and_allocate(step)
        if step < final_step:
            record_importance(c, step, allocator, names)
        out = c.expected
        if step <= final_step:
            budget, mask_ind = allocator.budget_schedule(step)
            masked = bool(mask_ind) or step == final_step
            out[f"step{step}.budget"], out[f"step{step}.masked"] = budget, masked
            if masked:
                masked_scores(c, step, captured, [(n, r) for n, r, _, _ in cfg["layers"]])
                for name in names:
                    out[f"step{step}.rank_pattern.{name}"] = rank_pattern_of(model, name)
        for name in names:
            out[f"step{step}.lora_E.{name}"] = t2n(lora(getattr(inner, name), "lora_E"))
    return c.expected


def _set_base(module: torch.nn.Module, targeted: bool, weight: Any, bias: Any) -> None:
    """The case's base weight and bias into a layer: the adapted layer's base layer, or a frozen
    layer, or every copy a modules_to_save wrapper holds (its original and its trained copy)."""
    if targeted:
        copies = [compat.base_layer(module)]
    elif hasattr(module, "original_module"):
        copies = [module.original_module, *module.modules_to_save.values()]
    else:
        copies = [module]
    for layer in copies:
        set_(layer.weight, weight)
        set_(layer.bias, bias)


def run_trajectory(case: Case) -> Outputs:
    """The network trained n_steps with AdamW, update_and_allocate after each optimizer step (14.7)."""
    cfg, dtype = case.config, TORCH_DTYPES[case.dtype]
    ada = cfg["adalora"]
    layers = cfg["layers"]
    stack = Stack(
        [(n, i, o) for n, i, o, _ in layers], convs=cfg["conv"] or None, conv1d=ada.get("fan_in_fan_out", False)
    )
    stack = stack.to(dtype)
    stack.loss_name = cfg["loss"]
    model = adalora(stack, **ada)
    if cfg["other_adapter"] is not None:
        model.add_adapter("other", peft.AdaLoraConfig(**cfg["other_adapter"]))
        model.base_model.set_adapter(["default", "other"])
    inner = model.base_model.model
    targets = [n for n, *_, targeted in layers if targeted]
    replays = {}
    for n, _, _, targeted in layers:
        module = getattr(inner, n)
        _set_base(module, targeted, case.inputs[f"base.{n}.weight"], case.inputs[f"base.{n}.bias"])
        for adapter, prefix in (("default", "init"), ("other", "init_other")):
            for part in PARTS:
                if f"{prefix}.{n}.{part}" in case.inputs:
                    set_(getattr(module, part)[adapter], case.inputs[f"{prefix}.{n}.{part}"])
        if targeted and f"step{cfg.get('first_step', 1)}.dropout_mask.{n}" in case.inputs:
            replays[n] = module.lora_dropout["default"] = ReplayDropout()
    checked = {c.key.removeprefix("final_base.") for c in case.checks if c.key.startswith("final_base.")}
    trainable = {
        case_name(n.removeprefix("base_model.model."), checked): p
        for n, p in model.named_parameters()
        if p.requires_grad and "ranknum" not in n and not n.endswith(".other")
    }
    adamw = dict(cfg.get("adamw", {}))
    if "betas" in adamw:
        adamw["betas"] = tuple(adamw["betas"])
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=cfg["lr"], **adamw)
    allocator = model.base_model.rankallocator
    final_step = ada["total_step"] - ada["tfinal"]
    after_optimizer = set(cfg.get("after_optimizer_steps", []))
    c = scratch(case)
    out = c.expected
    first = cfg.get("first_step", 1)
    for step in range(first, first + cfg["n_steps"]):
        for n, replay in replays.items():
            replay.mask = tensor_of(case.inputs[f"step{step}.dropout_mask.{n}"])
        x, target = tensor_of(case.inputs[f"step{step}.x"]), tensor_of(case.inputs[f"step{step}.target"])
        result, params, captured = peft_step(model, optimizer, trainable, step, x, target, step in after_optimizer)
        out[f"step{step}.task_loss"] = t2n(stack.task_loss)
        out[f"step{step}.orth_loss"] = t2n(result.loss - stack.task_loss)
        out[f"step{step}.loss"] = t2n(result.loss)
        if params:
            record_after_optimizer(c, step, params, targets)
        budget, mask_ind = allocator.budget_schedule(step)
        masked = step <= final_step and (bool(mask_ind) or step == final_step)
        if masked and step < final_step:
            record_importance(c, step, allocator, targets)
        if step <= final_step:
            out[f"step{step}.budget"] = budget
        if masked:
            masked_scores(c, step, captured, [(n, lora(getattr(inner, n), "lora_E").shape[0]) for n in targets])
        pattern = model.peft_config["default"].rank_pattern
        out[f"step{step}.rank_pattern"] = (
            None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}
        )
        for n in targets:
            module = getattr(inner, n)
            out[f"step{step}.E_nonzero.{n}"] = [bool(v) for v in t2n(lora(module, "lora_E"))[:, 0] != 0]
            out[f"step{step}.ranknum.{n}"] = float(module.ranknum["default"].detach())
    for n in targets:
        for part in PARTS:
            out[f"final.{n}.{part}"] = t2n(lora(getattr(inner, n), part))
    for key, p in trainable.items():
        if "lora_" not in key:
            out[f"final_base.{key}"] = t2n(p)
    saved_names = {c.key.removeprefix("saved.") for c in case.checks if c.key.startswith("saved.")}
    for key, value in compat.save_adapter(model).items():
        out[f"saved.{case_name(key, saved_names)}"] = t2n(value)
    return out


def run_checkpoint(case: Case) -> Outputs:
    """The saved adapter loaded onto the case's base layers by the release, and the network's output
    in evaluation mode (14.8)."""
    cfg = case.config
    layers = cfg["layers"]
    convs = cfg.get("conv")
    fan = bool(cfg["adalora"].get("fan_in_fan_out"))
    fresh = Stack([tuple(layer) for layer in layers], convs=convs, conv1d=fan).double()
    for n, _, _ in layers:
        set_(getattr(fresh, n).weight, case.inputs[f"base.{n}.weight"])
        set_(getattr(fresh, n).bias, case.inputs[f"base.{n}.bias"])
    beside = cfg.get("default_adapter")
    adapter = cfg.get("adapter_name", "default")
    saved_dir = case.files["adapter_config.json"].parent
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = compat.loadable_adapter(saved_dir, Path(tmp) / "adapter")
        if beside:
            loaded = adalora(fresh, **beside)
            for n in beside["target_modules"]:
                for part in PARTS:
                    set_(
                        getattr(getattr(loaded.base_model.model, n), part)["default"],
                        case.inputs[f"default.{n}.{part}"],
                    )
            loaded.load_adapter(str(adapter_dir), adapter_name=adapter)
            loaded.base_model.set_adapter(["default", adapter])
        else:
            loaded = peft.PeftModel.from_pretrained(compat.with_model_config(fresh), str(adapter_dir))
        loaded.eval()
    inner = loaded.base_model.model
    out: Outputs = {}
    for n, _, _ in layers:
        module = getattr(inner, n)
        if not hasattr(module, "lora_E"):
            continue
        out[f"r.{n}"] = int(module.lora_E[adapter].shape[0])
        out[f"ranknum.{n}"] = float(module.ranknum[adapter].detach())
        out[f"scaling.{n}"] = module.scaling[adapter]
    with torch.no_grad():
        out["y"] = t2n(inner(tensor_of(case.inputs["x"])).logits)
    return out
