"""The reference's answers to golden cases: `run_case(case, xp)` -> {key: value} for every check.

One function per case kind reads the case's config and inputs, runs adalora_ref on backend `xp`
in the case's dtype, and returns its outputs under the keys the checks name. A port produces the
same keys from the same inputs (docs/SPEC.md, "Writing a port's outputs"); this module is the
worked example of doing so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._backend import dtype_by_name, from_numpy, to_numpy
from ..allocator import PARTS, Allocation
from ..checkpoint import adapter_state_dict, add_saved_adapter, load_adapter
from ..config import AdaLoraConfig, is_target
from ..conv import BaseConv2d, SVDConv2d
from ..layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from ..mlp import MLP, cross_entropy_loss, mse_loss
from ..model import AdaLoraModel, BaseLinear
from ..optim import AdamW
from ..orth import orthogonal_regularizer
from ..training import train_step
from .case import Case

Outputs = dict[str, Any]


class _Inputs:
    """The case's input tensors moved to backend `xp` in the case's dtype (integers stay integers)."""

    def __init__(self, case: Case, xp: Any) -> None:
        self.case, self.xp = case, xp
        self.dtype = dtype_by_name(xp, case.dtype)

    def __call__(self, name: str) -> Any:
        value = self.case.inputs[name]
        if np.issubdtype(value.dtype, np.integer):
            return self.xp.asarray(value)
        return from_numpy(self.xp, value, dtype=self.dtype)

    def get(self, name: str) -> Any:
        return self(name) if name in self.case.inputs else None

    def triplet(self, prefix: str) -> SVDTriplet:
        return SVDTriplet(*(self(f"{prefix}{part}") for part in PARTS))


def _np(x: Any) -> np.ndarray:
    return np.array(to_numpy(x))  # a copy: the allocator updates its state in place


def run_layer(case: Case, xp: Any) -> Outputs:
    c, get = case.config, _Inputs(case, xp)
    layer = SVDLinear(
        get("weight"), get.get("bias"), get.triplet(""), lora_alpha=c["lora_alpha"], fan_in_fan_out=c["fan_in_fan_out"]
    )
    return _layer_outputs(layer, get, c)


def _conv_geometry(conv: dict[str, Any]) -> dict[str, Any]:
    """stride, padding and dilation of a case's torch.nn.Conv2d arguments (torch's defaults where absent)."""
    return {"stride": conv.get("stride", 1), "padding": conv.get("padding", 0), "dilation": conv.get("dilation", 1)}


def run_conv_layer(case: Case, xp: Any) -> Outputs:
    c, get = case.config, _Inputs(case, xp)
    layer = SVDConv2d(
        get("weight"), get.get("bias"), get.triplet(""), lora_alpha=c["lora_alpha"], **_conv_geometry(c["conv"])
    )
    return _layer_outputs(layer, get, c)


def _layer_outputs(layer: SVDLinear | SVDConv2d, get: _Inputs, config: dict[str, Any]) -> Outputs:
    """A layer case's outputs: forward, backward, delta weight, merge and unmerge, in that order; then
    the forward with the adapters disabled, a safe merge and the merged forward. A `safe_merge_only`
    case runs only the safe merge, which its overflowing adapter makes peft refuse."""
    if config.get("safe_merge_only"):
        return _refused_safe_merge(layer)
    y, cache = layer.forward(get("x"), get.get("dropout_mask"))
    grad_x, grads = layer.backward(cache, get("grad_y"))
    out: Outputs = {"scaling": layer.scaling, "ranknum": float(layer.ranknum[0]), "y": _np(y), "grad_x": _np(grad_x)}
    out.update({f"grad_{part}": _np(getattr(grads, part)) for part in PARTS})
    out["delta_weight"] = _np(layer.delta_weight())
    layer.merge()
    out["merged_weight"] = _np(layer.weight)
    layer.unmerge()
    out["unmerged_weight"] = _np(layer.weight)
    layer.disable_adapters = True  # only the base layer runs
    out["y_disabled"] = _np(layer.forward(get("x"))[0])
    layer.disable_adapters = False
    try:
        layer.merge(safe_merge=True)
    except ValueError:  # a non-finite merge is refused, as peft refuses it: no merged outputs then
        return out
    out["safe_merged_weight"] = _np(layer.weight)
    out["y_merged"] = _np(layer.forward(get("x"))[0])  # a merged layer runs its (merged) base layer alone
    return out


def _refused_safe_merge(layer: SVDLinear | SVDConv2d) -> Outputs:
    """merge(safe_merge=True) on the fresh layer: refused (a ValueError) when the merged weight is not
    finite, the base weight and the merged flag then left as they were."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point (NumPy would warn)
            layer.merge(safe_merge=True)
    except ValueError:
        refused = True
    else:
        refused = False
    return {"safe_merge_refused": refused, "merged": layer.merged, "weight_after_refused_merge": _np(layer.weight)}


def run_init(case: Case, xp: Any) -> Outputs:
    c = case.config
    t = init_triplet(
        np.random.default_rng(c["seed"]),
        c["r"],
        c["in_features"],
        c["out_features"],
        init_lora_weights=c["init_lora_weights"],
        xp=xp,
        dtype=dtype_by_name(xp, case.dtype),
    )
    out: Outputs = {part: _np(getattr(t, part)) for part in PARTS}
    if c["r"] > 0:  # an empty triplet (init/r_zero) has no statistics
        out.update({f"std.{part}": np.asarray(np.std(out[part])) for part in PARTS})
        out.update({f"mean.{part}": np.asarray(np.mean(out[part])) for part in PARTS})
    return out


def run_orth(case: Case, xp: Any) -> Outputs:
    get = _Inputs(case, xp)
    names = [layer[0] for layer in case.config["layers"]]
    triplets = []
    for name in names:
        A, B = get(f"{name}.lora_A"), get(f"{name}.lora_B")
        triplets.append(SVDTriplet(A, xp.ones((A.shape[0], 1), dtype=A.dtype), B))
    value, grads = orthogonal_regularizer(triplets, case.config["orth_reg_weight"])
    out: Outputs = {"value": _np(value)}
    for name, (g_A, g_B) in zip(names, grads, strict=True):
        out[f"grad.{name}.lora_A"], out[f"grad.{name}.lora_B"] = _np(g_A), _np(g_B)
    return out


def _allocator_config(c: dict[str, Any]) -> AdaLoraConfig:
    keys = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step", "beta1", "beta2")
    return AdaLoraConfig(**{k: c[k] for k in keys if k in c}, target_modules=[layer[0] for layer in c["layers"]])


def run_schedule(case: Case, xp: Any) -> Outputs:
    from ..allocator import budget_schedule  # looked up per call: a test's wrong port replaces it in allocator

    c = case.config
    init_bgt, target_bgt = sum(c["layer_ranks"]), c["target_r"] * len(c["layer_ranks"])
    out: Outputs = {"init_bgt": init_bgt, "target_bgt": target_bgt}
    for step in c["steps"]:
        budget, mask = budget_schedule(
            step,
            init_bgt=init_bgt,
            target_bgt=target_bgt,
            tinit=c["tinit"],
            tfinal=c["tfinal"],
            total_step=c["total_step"],
            deltaT=c["deltaT"],
        )
        out[f"step{step}.budget"], out[f"step{step}.mask"] = budget, mask
    return out


def run_allocator(case: Case, xp: Any) -> Outputs:
    """peft's AdaLoraModel.update_and_allocate driven with given parameters and gradients per step."""
    c, get = case.config, _Inputs(case, xp)
    dtype = dtype_by_name(xp, case.dtype)
    config = _allocator_config(c)
    base = {name: BaseLinear(xp.zeros((n_out, n_in), dtype=dtype)) for name, _, n_in, n_out in c["layers"]}
    model = AdaLoraModel(base, config)
    # layers listed with r < init_r start smaller (as if resized): keep their first r rows
    model.resize_by_rank_pattern({name: [i < r for i in range(config.init_r)] for name, r, _, _ in c["layers"]})
    final_step = config.total_step - config.tfinal
    out: Outputs = {}
    for step in _steps(c):
        model.set_triplets({name: get.triplet(f"step{step}.{name}.") for name in model.adapted})
        grads = {
            name: TripletGrads(*(get(f"step{step}.{name}.{part}.grad") for part in PARTS)) for name in model.adapted
        }
        allocation = model.update_and_allocate(step, grads)
        if step < final_step:
            out.update(_importance(step, model))
        if allocation is not None:
            out[f"step{step}.budget"] = allocation.budget
            out[f"step{step}.masked"] = allocation.masked
            if allocation.masked:
                out.update(_masking(step, allocation))
                for name in model.adapted:
                    out[f"step{step}.rank_pattern.{name}"] = allocation.rank_pattern[name]
        for name, layer in model.adapted.items():
            out[f"step{step}.lora_E.{name}"] = _np(layer.triplet.lora_E)
    return out


def _steps(c: dict[str, Any]) -> range:
    """The steps a case runs: n_steps of them from its `first_step` (1 when the config does not say)."""
    first = c.get("first_step", 1)
    return range(first, first + c["n_steps"])


def _importance(step: int, model: AdaLoraModel) -> Outputs:
    """The allocator's importance state after `step`: ipt, exp_avg_ipt, exp_avg_unc of every part."""
    out: Outputs = {}
    for name in model.adapted:
        for part in PARTS:
            state = model.allocator.state[name][part]
            for quantity in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                out[f"step{step}.{quantity}.{name}.{part}"] = _np(getattr(state, quantity))
    return out


def _masking(step: int, allocation: Allocation) -> Outputs:
    """What a masking step decided from: each layer's triplet scores and the threshold."""
    out: Outputs = {f"step{step}.threshold": np.asarray(allocation.threshold)}
    out.update({f"step{step}.scores.{name}": _np(score) for name, score in allocation.scores.items()})
    return out


def _base_from_case(case: Case, xp: Any) -> dict[str, BaseLinear | BaseConv2d]:
    """The case's base layers, `base.<L>.weight` and `.bias`: conv layers where its `conv` says."""
    get = _Inputs(case, xp)
    convs = case.config.get("conv", {})
    base: dict[str, BaseLinear | BaseConv2d] = {}
    for name, *_ in case.config["layers"]:
        weight, bias = get(f"base.{name}.weight"), get.get(f"base.{name}.bias")
        base[name] = (
            BaseConv2d(weight, bias, **_conv_geometry(convs[name])) if name in convs else BaseLinear(weight, bias)
        )
    return base


def run_trajectory(case: Case, xp: Any) -> Outputs:
    c, get = case.config, _Inputs(case, xp)
    config = AdaLoraConfig(**c["adalora"])
    net = MLP(AdaLoraModel(_base_from_case(case, xp), config))
    model = net.model
    model.set_triplets({name: get.triplet(f"init.{name}.") for name in model.adapted})
    if c.get("other_adapter"):  # an inference adapter, active together with the trained one
        model.add_adapter("other", AdaLoraConfig(**c["other_adapter"]))
        model.set_triplets({name: get.triplet(f"init_other.{name}.") for name in model.triplets("other")}, "other")
        model.set_adapter(["default", "other"])
    adamw = c.get("adamw", {})  # torch's defaults but lr unless the case states them (suite 1.1)
    optimizer = AdamW(lr=c["lr"], **{k: tuple(v) if k == "betas" else v for k, v in adamw.items()})
    loss_fn = mse_loss if c["loss"] == "mse" else cross_entropy_loss
    final_step = config.total_step - config.tfinal
    out: Outputs = {}
    _keep_parameters_after_optimizer(model, set(c.get("after_optimizer_steps", [])), out)
    for step in _steps(c):
        masks = {name: get(key) for name in model.adapted if (key := f"step{step}.dropout_mask.{name}") in case.inputs}
        x, target = get(f"step{step}.x"), get(f"step{step}.target")
        result = train_step(net, optimizer, x, target, step, loss_fn, dropout_masks=masks)
        out[f"step{step}.loss"] = np.asarray(result.loss)
        out[f"step{step}.task_loss"] = np.asarray(result.loss - result.orth_reg)
        out[f"step{step}.orth_loss"] = np.asarray(result.orth_reg)
        allocation = result.allocation
        if step <= final_step and allocation is not None:
            out[f"step{step}.budget"] = allocation.budget
        if allocation is not None and allocation.masked:
            out.update(_masking(step, allocation))
            if step < final_step:  # the final masking resets the importance
                out.update(_importance(step, model))
        out[f"step{step}.rank_pattern"] = config.rank_pattern
        for name, layer in model.adapted.items():
            out[f"step{step}.E_nonzero.{name}"] = [bool(v) for v in (_np(layer.triplet.lora_E)[:, 0] != 0)]
            out[f"step{step}.ranknum.{name}"] = float(layer.ranknum[0])
    for name, layer in model.adapted.items():
        for part in PARTS:
            out[f"final.{name}.{part}"] = _np(getattr(layer.triplet, part))
    out.update({f"final_base.{key}": _np(value) for key, value in model.base_params().items()})
    out.update({f"saved.{key}": value for key, value in adapter_state_dict(model).items()})
    return out


def _keep_parameters_after_optimizer(model: AdaLoraModel, steps: set[int], out: Outputs) -> None:
    """At each of `steps`, record every trained parameter as the optimizer step left it: the model
    as update_and_allocate finds it (`step<s>.after_optimizer.<L>.<P>`, `...<base parameter>`)."""
    if not steps:
        return
    allocate = model.update_and_allocate

    def recording(global_step: int, grads: Any) -> Allocation | None:
        if global_step in steps:
            at = f"step{global_step}.after_optimizer"
            for name, triplet in model.triplets().items():
                out.update({f"{at}.{name}.{part}": _np(getattr(triplet, part)) for part in PARTS})
            out.update({f"{at}.{key}": _np(value) for key, value in model.base_params().items()})
        return allocate(global_step, grads)

    model.update_and_allocate = recording  # type: ignore[method-assign]


def run_checkpoint(case: Case, xp: Any) -> Outputs:
    """Load the case's saved adapter onto its base layers, or, with `default_adapter`, beside that
    adapter under the name `adapter_name` (both active), and run the network."""
    c, get = case.config, _Inputs(case, xp)
    base = _base_from_case(case, xp)
    directory = next(iter(case.files.values())).parent
    name = c.get("adapter_name", "default")
    if "default_adapter" in c:
        model = AdaLoraModel(base, AdaLoraConfig(**c["default_adapter"]))
        model.set_triplets({n: get.triplet(f"default.{n}.") for n in model.triplets("default")}, "default")
        add_saved_adapter(model, directory, name)
        model.set_adapter(["default", name])
    else:
        model = load_adapter(directory, base)
    out: Outputs = {"y": _np(MLP(model).forward(get("x"))[0])}
    for layer_name, layer in model.adapted.items():
        if name in layer.adapters:
            adapter = layer.adapters[name]
            out[f"r.{layer_name}"], out[f"ranknum.{layer_name}"] = adapter.triplet.r, float(adapter.ranknum[0])
            out[f"scaling.{layer_name}"] = adapter.scaling
    return out


def run_config(case: Case, xp: Any) -> Outputs:
    out: Outputs = {}
    for i, entry in enumerate(case.config["entries"]):
        try:
            config = AdaLoraConfig(**entry["kwargs"])
        except ValueError:
            out[f"entry{i}.valid"] = False
            continue
        out[f"entry{i}.valid"] = True
        saved = config.to_dict()
        out[f"entry{i}.adapter_config"] = {k: saved.get(k) for k in entry["compare_fields"]}
    return out


def run_targeting(case: Case, xp: Any) -> Outputs:
    """For each entry, the listed modules its config targets (8.5), sorted."""
    modules = case.config["modules"]
    out: Outputs = {}
    for i, entry in enumerate(case.config["entries"]):
        config = AdaLoraConfig(**entry["kwargs"])
        out[f"entry{i}.targeted"] = sorted(name for name in modules if is_target(config, name))
    return out


RUNNERS: dict[str, Callable[[Case, Any], Outputs]] = {
    "layer": run_layer,
    "conv_layer": run_conv_layer,
    "init": run_init,
    "orth": run_orth,
    "schedule": run_schedule,
    "allocator": run_allocator,
    "trajectory": run_trajectory,
    "checkpoint": run_checkpoint,
    "config": run_config,
    "targeting": run_targeting,
}


def run_case(case: Case, xp: Any) -> Outputs:
    """The reference's outputs for `case` on backend `xp`."""
    if case.kind not in RUNNERS:
        raise ValueError(f"case {case.id}: unknown kind {case.kind!r}; known: {', '.join(RUNNERS)}")
    return RUNNERS[case.kind](case, xp)
