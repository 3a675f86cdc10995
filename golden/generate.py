"""Generate the golden cases by running real PyTorch peft 0.21.2 (torch CPU), deterministically.

    python golden/generate.py                 # (re)write golden/cases/ and its MANIFEST.json
    python golden/generate.py --out DIR       # write elsewhere
    python golden/generate.py --check         # regenerate into a temporary directory and compare
                                              # with the committed cases (CI runs this)

Needs the `golden` extra (torch==2.13.0, peft==0.21.2). Every expected output below comes out of
peft or torch; the generator only chooses inputs, drives peft, and records what it computes. The
case format is described in adalora_ref/conformance/case.py and docs/SPEC.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import peft
import torch
from safetensors.numpy import load_file
from transformers.pytorch_utils import Conv1D

from adalora_ref.conformance.case import (
    MANIFEST,
    Case,
    Check,
    case_ids,
    read_case,
    read_manifest,
    write_case,
    write_manifest,
)
from adalora_ref.conformance.compare import compare

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
PARTS = ("lora_A", "lora_E", "lora_B")
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROVENANCE = {
    "peft": peft.__version__,
    "torch": torch.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
    "generator": "golden/generate.py",
}
MARGIN_FLOOR = {"float64": 1e-8, "float32": 1e-3}


def t2n(t: torch.Tensor, dtype: str | None = None) -> np.ndarray:
    array = t.detach().cpu().numpy().copy()
    return array.astype(dtype) if dtype else array


def lora(module: torch.nn.Module, part: str) -> torch.nn.Parameter:
    return getattr(module, part)["default"]


def tensor(key: str, quantity: str, *, step: int | None = None, layer: str | None = None, rtol=None) -> Check:
    return Check(key, quantity, "tensor", step, layer, rtol)


def exact(key: str, quantity: str, *, step: int | None = None, layer: str | None = None) -> Check:
    return Check(key, quantity, "exact", step, layer)


class Stack(torch.nn.Module):
    """Named base layers; `forward` runs them in order with ReLU between and returns `.loss`.

    A layer named in `convs` is a torch.nn.Conv2d built from its entry (in_channels, out_channels,
    kernel_size, stride, padding, dilation); a 4-D activation is flattened (torch.flatten(x, 1))
    before a linear layer.
    """

    def __init__(
        self,
        layers: list[tuple[str, int, int]],
        *,
        conv1d: bool = False,
        bias: bool = True,
        convs: dict[str, dict] | None = None,
    ) -> None:
        super().__init__()
        self.order = [name for name, _, _ in layers]
        convs = convs or {}
        self.conv_names = set(convs)
        for name, n_in, n_out in layers:
            if name in convs:
                layer = torch.nn.Conv2d(**convs[name], bias=bias)
            else:
                layer = Conv1D(n_out, n_in) if conv1d else torch.nn.Linear(n_in, n_out, bias=bias)
            self.add_module(name, layer)
        self.loss_name = "mse"

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> Any:
        for i, name in enumerate(self.order):
            if x.dim() == 4 and name not in self.conv_names:
                x = torch.flatten(x, 1)
            x = getattr(self, name)(x)
            if i < len(self.order) - 1:
                x = torch.relu(x)
        if target is None:
            loss = (x * 0.0).sum()
        elif self.loss_name == "mse":
            loss = torch.nn.functional.mse_loss(x, target)
        else:
            loss = torch.nn.functional.cross_entropy(x, target)
        return SimpleNamespace(loss=loss, logits=x)


def adalora(stack: torch.nn.Module, **config: Any) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(stack, peft.AdaLoraConfig(**config))


def case(kind: str, name: str, dtype: str, description: str, config: dict, seed: int) -> Case:
    return Case(
        id=f"{kind}/{name}",
        kind=kind,
        dtype=dtype,
        description=description,
        config=config,
        inputs={},
        checks=[],
        expected={},
        provenance={**PROVENANCE, "seed": seed},
    )


def record(c: Case, check: Check, value: Any) -> None:
    c.checks.append(check)
    c.expected[check.key] = value


# ---------------------------------------------------------------------------------------------
# layer: SVDLinear forward, the four gradients, delta weight, merge, unmerge


LAYER_CASES = [
    # name, in, out, r, fan_in_fan_out, bias, lora_alpha, input leading dims, dropout p
    ("basic", 12, 10, 4, False, True, 8, (6,), 0.0),
    ("no_bias", 9, 14, 3, False, False, 16, (5,), 0.0),
    ("fan_in_fan_out", 10, 7, 5, True, True, 8, (4,), 0.0),
    ("alpha_zero", 8, 8, 3, False, True, 0, (4,), 0.0),
    ("r_zero", 6, 5, 0, False, True, 8, (3,), 0.0),
    ("r_one", 6, 5, 1, False, True, 32, (3,), 0.0),
    ("input_3d", 8, 6, 4, False, True, 8, (2, 3), 0.0),
    ("input_1d", 8, 6, 4, False, True, 8, (), 0.0),
    ("dropout", 11, 9, 4, False, True, 8, (2, 5), 0.3),
]


def gen_layer(name: str, dtype: str, seed: int, spec: tuple) -> Case:
    _, n_in, n_out, r, fan, bias, alpha, lead, p = spec
    config = {
        "in_features": n_in,
        "out_features": n_out,
        "r": r,
        "lora_alpha": alpha,
        "fan_in_fan_out": fan,
        "bias": bias,
        "lora_dropout": p,
        "input_shape": [*lead, n_in],
    }
    c = case("layer", f"{name}_{dtype[-2:]}", dtype, f"SVDLinear forward, backward and merge: {name}", config, seed)
    torch.manual_seed(seed)
    stack = Stack([("proj", n_in, n_out)], conv1d=fan, bias=bias).to(TORCH_DTYPES[dtype])
    model = adalora(
        stack,
        target_modules=["proj"],
        init_r=r,
        target_r=0,
        total_step=10,
        lora_alpha=alpha,
        lora_dropout=p,
        fan_in_fan_out=fan,
        init_lora_weights=False,
    )
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    c.inputs["weight"] = t2n(base.weight)
    if base.bias is not None:
        c.inputs["bias"] = t2n(base.bias)
    for part in PARTS:
        c.inputs[part] = t2n(lora(layer, part))
    x = torch.randn(*lead, n_in, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    grad_y = torch.randn(*lead, n_out, dtype=TORCH_DTYPES[dtype])
    c.inputs["x"], c.inputs["grad_y"] = t2n(x), t2n(grad_y)
    model.train()
    if p > 0:
        torch.manual_seed(seed + 1)
        c.inputs["dropout_mask"] = t2n(torch.nn.functional.dropout(torch.ones_like(x), p, training=True))
        torch.manual_seed(seed + 1)  # peft's dropout draws the same mask
    y = layer(x)
    y.backward(grad_y)
    record(c, exact("scaling", "scaling"), layer.scaling["default"])
    record(c, exact("ranknum", "ranknum"), float(layer.ranknum["default"].detach()))
    record(c, tensor("y", "output y"), t2n(y))
    record(c, tensor("grad_x", "input gradient"), t2n(x.grad))
    for part in PARTS:
        record(c, tensor(f"grad_{part}", f"gradient of {part}"), t2n(lora(layer, part).grad))
    record(c, tensor("delta_weight", "delta weight"), t2n(layer.get_delta_weight("default")))
    layer.merge()
    record(c, tensor("merged_weight", "merged base weight"), t2n(base.weight))
    layer.unmerge()
    record(c, tensor("unmerged_weight", "unmerged base weight"), t2n(base.weight))
    return c


# ---------------------------------------------------------------------------------------------
# conv_layer: SVDConv2d forward, the four gradients, delta weight (a kernel), merge, unmerge

CONV_LAYER_CASES = [
    # name, conv (torch.nn.Conv2d's arguments), r, lora_alpha, bias, input shape, dropout p
    ("basic", {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1}, 4, 8, True, (2, 3, 6, 5), 0.0),
    (
        "strided_dilated",
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": (2, 3),
            "stride": (2, 1),
            "padding": (1, 0),
            "dilation": (1, 2),
        },
        3,
        16,
        True,
        (2, 4, 7, 9),
        0.0,
    ),
    (
        "same_padding",
        {"in_channels": 2, "out_channels": 3, "kernel_size": (3, 2), "padding": "same", "dilation": (2, 1)},
        2,
        8,
        False,
        (1, 2, 5, 6),
        0.0,
    ),
    ("pointwise_alpha_zero", {"in_channels": 5, "out_channels": 3, "kernel_size": 1}, 4, 0, True, (3, 5, 4, 4), 0.0),
    (
        "unbatched_valid",
        {"in_channels": 3, "out_channels": 2, "kernel_size": 2, "padding": "valid"},
        2,
        8,
        True,
        (3, 5, 5),
        0.0,
    ),
    (
        "dropout",
        {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1},
        3,
        8,
        True,
        (2, 3, 6, 6),
        0.25,
    ),
]


def gen_conv_layer(dtype: str, seed: int, spec: tuple) -> Case:
    name, conv, r, alpha, bias, input_shape, p = spec
    config = {
        "conv": conv,
        "r": r,
        "lora_alpha": alpha,
        "bias": bias,
        "lora_dropout": p,
        "input_shape": list(input_shape),
    }
    description = f"SVDConv2d forward, backward and merge: {name}"
    c = case("conv_layer", f"{name}_{dtype[-2:]}", dtype, description, config, seed)
    torch.manual_seed(seed)
    stack = Stack([("conv", 0, 0)], bias=bias, convs={"conv": conv}).to(TORCH_DTYPES[dtype])
    model = adalora(
        stack,
        target_modules=["conv"],
        init_r=r,
        target_r=0,
        total_step=10,
        lora_alpha=alpha,
        lora_dropout=p,
        init_lora_weights=False,
    )
    layer = model.base_model.model.conv
    base = layer.get_base_layer()
    c.inputs["weight"] = t2n(base.weight)
    if base.bias is not None:
        c.inputs["bias"] = t2n(base.bias)
    for part in PARTS:
        c.inputs[part] = t2n(lora(layer, part))
    x = torch.randn(*input_shape, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    model.train()
    with torch.no_grad():
        out_shape = base(x).shape
    grad_y = torch.randn(*out_shape, dtype=TORCH_DTYPES[dtype])
    c.inputs["x"], c.inputs["grad_y"] = t2n(x), t2n(grad_y)
    if p > 0:
        torch.manual_seed(seed + 1)
        c.inputs["dropout_mask"] = t2n(torch.nn.functional.dropout(torch.ones_like(x), p, training=True))
        torch.manual_seed(seed + 1)  # peft's dropout draws the same mask
    y = layer(x)
    y.backward(grad_y)
    record(c, exact("scaling", "scaling"), layer.scaling["default"])
    record(c, exact("ranknum", "ranknum"), float(layer.ranknum["default"].detach()))
    record(c, tensor("y", "output y"), t2n(y))
    record(c, tensor("grad_x", "input gradient"), t2n(x.grad))
    for part in PARTS:
        record(c, tensor(f"grad_{part}", f"gradient of {part}"), t2n(lora(layer, part).grad))
    record(c, tensor("delta_weight", "delta weight (a kernel)"), t2n(layer.get_delta_weight("default")))
    layer.merge()
    record(c, tensor("merged_weight", "merged base kernel"), t2n(base.weight))
    layer.unmerge()
    record(c, tensor("unmerged_weight", "unmerged base kernel"), t2n(base.weight))
    return c


# ---------------------------------------------------------------------------------------------
# init: what peft draws for a fresh adapter (statistics: the draws themselves are torch's RNG)


def gen_init(init_lora_weights: bool, seed: int) -> Case:
    n_in, n_out, r = 512, 384, 256
    config = {"in_features": n_in, "out_features": n_out, "r": r, "init_lora_weights": init_lora_weights, "seed": seed}
    name = "default" if init_lora_weights else "init_lora_weights_false"
    c = case(
        "init", name, "float32", f"a fresh SVDLinear triplet ({name}): E, and mean and std of A, E, B", config, seed
    )
    torch.manual_seed(seed)
    model = adalora(
        Stack([("proj", n_in, n_out)]),
        target_modules=["proj"],
        init_r=r,
        target_r=0,
        total_step=10,
        init_lora_weights=init_lora_weights,
    )
    layer = model.base_model.model.proj
    if init_lora_weights:
        record(c, tensor("lora_E", "initial lora_E", rtol=0.0), t2n(lora(layer, "lora_E")))
    for part in PARTS:  # sample statistics of >= 98k draws (E: 256): 5% (E: 20%) is well beyond their noise
        values = t2n(lora(layer, part)).astype(np.float64)
        loose = 0.2 if part == "lora_E" else 0.05
        if not (init_lora_weights and part == "lora_E"):
            std = np.asarray(values.std(), dtype=np.float32)  # statistics stored in the case's dtype
            record(c, tensor(f"std.{part}", f"std of initial {part}", rtol=loose), std)
            scale = values.std() / np.sqrt(values.size) * 5  # |mean| within 5 standard errors
            mean = Check(f"mean.{part}", f"mean of initial {part}", "tensor", None, None, float(scale))
            record(c, mean, np.asarray(0.0, dtype=np.float32))
    return c


# ---------------------------------------------------------------------------------------------
# orth: the orthogonal regularizer through peft's AdaLoraModel.forward (output with .loss)


def gen_orth(name: str, dtype: str, seed: int, init_r: int, weight: float, orthonormal_first: bool) -> Case:
    layers = [("q", 8, 8), ("v", 8, 12), ("fc", 12, 5)]
    config = {"orth_reg_weight": weight, "layers": [[n, init_r, i, o] for n, i, o in layers]}
    c = case("orth", name, dtype, f"orthogonal regularizer and its gradients: {name}", config, seed)
    torch.manual_seed(seed)
    model = adalora(
        Stack(layers).to(TORCH_DTYPES[dtype]),
        target_modules=[n for n, _, _ in layers],
        init_r=init_r,
        target_r=0,
        total_step=10,
        init_lora_weights=False,
        orth_reg_weight=weight,
    )
    inner = model.base_model.model
    if orthonormal_first:  # rows of the identity: ||A A^T - I|| is exactly 0 and torch's gradient is 0
        with torch.no_grad():
            A = lora(inner.q, "lora_A")
            A.zero_()
            for i in range(init_r):
                A[i, i] = 1.0
    loss = model.base_model(torch.zeros(2, 8, dtype=TORCH_DTYPES[dtype])).loss  # the task loss is exactly 0
    loss.backward()
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            c.inputs[f"{n}.{part}"] = t2n(lora(getattr(inner, n), part))
    record(c, tensor("value", "regularizer value"), t2n(loss))
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            record(
                c,
                tensor(f"grad.{n}.{part}", f"regularizer gradient of {part}", layer=n),
                t2n(lora(getattr(inner, n), part).grad),
            )
    return c


# ---------------------------------------------------------------------------------------------
# schedule: budget and mask flag at every step, from peft's RankAllocator.budget_schedule


SCHEDULES = [
    # name, layer ranks, target_r, tinit, tfinal, total_step, deltaT
    ("default_like", [12] * 6, 8, 0, 0, 40, 1),
    ("tinit_tfinal_deltaT", [12] * 4, 4, 10, 15, 100, 7),
    ("tinit_zero", [6] * 3, 2, 0, 5, 30, 3),
    ("tfinal_zero", [6] * 3, 2, 4, 0, 30, 2),
    ("tiny_total_step", [4, 4], 1, 0, 0, 2, 1),
    ("init_equals_target", [5] * 3, 5, 2, 2, 12, 1),
    ("many_layers", [12] * 72, 8, 20, 30, 200, 10),
]


def gen_schedule(spec: tuple, seed: int) -> Case:
    name, ranks, target_r, tinit, tfinal, total_step, delta = spec
    steps = list(range(0, total_step + 4))
    config = {
        "layer_ranks": ranks,
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "total_step": total_step,
        "deltaT": delta,
        "steps": steps,
    }
    c = case("schedule", name, "float64", f"budget schedule: {name}", config, seed)
    layers = [(f"l{i}", 4, 4) for i in range(len(ranks))]
    model = adalora(
        Stack(layers),
        target_modules=[n for n, _, _ in layers],
        init_r=ranks[0],
        target_r=target_r,
        tinit=tinit,
        tfinal=tfinal,
        total_step=total_step,
        deltaT=delta,
    )
    allocator = model.base_model.rankallocator
    record(c, exact("init_bgt", "initial budget"), allocator.init_bgt)
    record(c, exact("target_bgt", "target budget"), allocator.target_bgt)
    for step in steps:
        budget, mask = allocator.budget_schedule(step)
        record(c, exact(f"step{step}.budget", "budget", step=step), budget)
        record(c, exact(f"step{step}.mask", "mask flag", step=step), bool(mask))
    return c


# ---------------------------------------------------------------------------------------------
# allocator: peft's update_and_allocate driven with chosen parameters and gradients


@contextlib.contextmanager
def capture_kthvalue(store: list) -> Iterator[None]:
    """Record the scores and k that peft's mask_to_budget hands to torch.kthvalue."""
    real = torch.kthvalue

    def spy(values, k, *args, **kwargs):
        result = real(values, k, *args, **kwargs)
        store.append((values.detach().clone(), k, result[0].item()))
        return result

    torch.kthvalue = spy
    try:
        yield
    finally:
        torch.kthvalue = real


ALLOCATOR_CASES = [
    # name, layers (name, r, in, out), target_r, tinit, tfinal, total_step, deltaT, n_steps, zero-gradient layers
    ("phases", [("q", 6, 10, 10), ("v", 6, 10, 16), ("fc", 6, 16, 8)], 3, 3, 6, 24, 2, 28, []),
    ("every_step", [("a", 4, 6, 6), ("b", 4, 6, 9)], 2, 0, 0, 10, 1, 12, []),
    ("ties", [("a", 4, 6, 6), ("b", 4, 6, 6), ("dead", 4, 6, 6)], 2, 0, 2, 10, 1, 12, ["dead"]),
    ("r_zero_layer", [("a", 5, 7, 7), ("empty", 0, 7, 5), ("b", 5, 5, 7)], 2, 1, 2, 12, 2, 14, []),
]


def gen_allocator(spec: tuple, dtype: str, seed: int) -> Case:
    name, layers, target_r, tinit, tfinal, total_step, delta, n_steps, dead = spec
    hyper = {
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "total_step": total_step,
        "deltaT": delta,
        "beta1": 0.85,
        "beta2": 0.85,
    }
    config = {**hyper, "init_r": layers[0][1], "layers": [list(layer) for layer in layers], "n_steps": n_steps}
    c = case(
        "allocator",
        f"{name}_{dtype[-2:]}",
        dtype,
        f"importance, scores and masking over {n_steps} steps: {name}",
        config,
        seed,
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    stack = torch.nn.Module()
    for layer_name, _, n_in, n_out in layers:
        stack.add_module(layer_name, torch.nn.Linear(n_in, n_out).to(torch_dtype))
    # peft gives every targeted layer init_r; a layer listed with a smaller r is rebuilt at that r with
    # peft's own update_layer, and the allocator's budget recounted from the actual ranks.
    model = adalora(stack, target_modules=[n for n, *_ in layers], init_r=layers[0][1], **hyper)
    inner = model.base_model.model
    for layer_name, r, _, _ in layers:
        if r != layers[0][1]:
            module = getattr(inner, layer_name)
            module.update_layer("default", r, 8, config=model.peft_config["default"])
    allocator = model.base_model.rankallocator
    allocator._set_budget_scheduler(inner)  # count the budget from the layers' actual ranks
    params = {(n, part): t2n(lora(getattr(inner, n), part)).astype(np.float64) for n, *_ in layers for part in PARTS}
    final_step = total_step - tfinal
    for step in range(1, n_steps + 1):
        for (n, part), value in params.items():
            p = lora(getattr(inner, n), part)
            noise = rng.normal(size=value.shape) * 0.05
            with torch.no_grad():
                p.copy_(torch.tensor(value + noise))
            grad = rng.normal(size=value.shape) * (0.0 if n in dead else 1.0)
            p.grad = torch.tensor(grad, dtype=torch_dtype)
            c.inputs[f"step{step}.{n}.{part}"] = t2n(p)
            c.inputs[f"step{step}.{n}.{part}.grad"] = t2n(p.grad)
        captured: list = []
        with capture_kthvalue(captured):
            model.base_model.update_and_allocate(step)
        if step < final_step:
            for n, *_ in layers:
                for part in PARTS:
                    key = f"{n}.{part}.default"
                    for quantity, state in (
                        ("ipt", allocator.ipt),
                        ("exp_avg_ipt", allocator.exp_avg_ipt),
                        ("exp_avg_unc", allocator.exp_avg_unc),
                    ):
                        record(
                            c,
                            tensor(f"step{step}.{quantity}.{n}.{part}", quantity, step=step, layer=f"{n}.{part}"),
                            t2n(state[key]),
                        )
        if step <= final_step:
            budget, mask_ind = allocator.budget_schedule(step)
            record(c, exact(f"step{step}.budget", "budget", step=step), budget)
            masked = bool(mask_ind) or step == final_step
            record(c, exact(f"step{step}.masked", "masking flag", step=step), masked)
            if masked:  # in the order they are computed: scores, threshold, then the decisions
                ((scores, _k, threshold),) = captured
                offset = 0
                for n, r, _, _ in layers:
                    record(
                        c,
                        tensor(f"step{step}.scores.{n}", "triplet scores", step=step, layer=n),
                        t2n(scores[offset : offset + r]),
                    )
                    offset += r
                record(c, tensor(f"step{step}.threshold", "threshold", step=step), np.asarray(threshold, dtype=dtype))
                pattern = model.peft_config["default"].rank_pattern
                for n, *_ in layers:
                    record(
                        c,
                        exact(f"step{step}.rank_pattern.{n}", "rank pattern", step=step, layer=n),
                        pattern[f"{n}.lora_E.default"],
                    )
                c.margins[f"step {step}"] = decision_margin(t2n(scores).astype(np.float64), threshold)
        for n, *_ in layers:
            record(
                c,
                tensor(f"step{step}.lora_E.{n}", "lora_E after update_and_allocate", step=step, layer=n),
                t2n(lora(getattr(inner, n), "lora_E")),
            )
        params = {
            (n, part): t2n(lora(getattr(inner, n), part)).astype(np.float64) for n, *_ in layers for part in PARTS
        }
    return c


def decision_margin(scores: np.ndarray, threshold: float) -> float:
    """How far the nearest score other than those equal to the threshold sits from it, relative to the
    largest score: a port whose scores err by less than this makes every mask decision as peft does."""
    scale = float(np.max(np.abs(scores))) or 1.0
    others = np.abs(scores[scores != threshold] - threshold)
    return float(np.min(others)) / scale if others.size else float("inf")


# ---------------------------------------------------------------------------------------------
# trajectory: an MLP trained with AdamW through all three phases, orthogonal term on


TRAJECTORY_LAYERS = [("fc1", 8, 16, True), ("fc2", 16, 12, True), ("fc3", 12, 10, True), ("head", 10, 4, False)]


CNN_LAYERS = [("conv1", 3, 4, True), ("conv2", 4, 6, True), ("fc1", 48, 10, True), ("head", 10, 4, False)]
CNN_CONVS = {
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
CNN_INPUT = (3, 7, 8)  # conv1 keeps 7 x 8, conv2 gives 4 x 2: fc1 sees 6 * 4 * 2 = 48 features


def gen_trajectory(
    name: str,
    dtype: str,
    loss: str,
    seed: int,
    overrides: dict | None = None,
    other: dict | None = None,
    *,
    layers: list[tuple[str, int, int, bool]] = TRAJECTORY_LAYERS,
    convs: dict[str, dict] | None = None,
    sample_shape: tuple[int, ...] = (8,),
) -> Case:
    """`overrides` change the adapter's config (bias modes, modules_to_save, a shorter schedule);
    `other` adds an inference-mode adapter "other", active together with "default"; `layers`,
    `convs` and `sample_shape` give another network (a CNN: conv layers, a flatten, linear layers)."""
    adalora_config = {
        "init_r": 6,
        "target_r": 3,
        "tinit": 5,
        "tfinal": 10,
        "deltaT": 3,
        "total_step": 60,
        "lora_alpha": 8,
        "orth_reg_weight": 0.5,
        "target_modules": [n for n, *_, targeted in layers if targeted],
        **(overrides or {}),
    }
    lr, batch = 0.02, 16
    n_steps = adalora_config["total_step"] + 6
    config = {
        "layers": [list(layer) for layer in layers],
        "conv": convs or {},
        "sample_shape": list(sample_shape),
        "adalora": adalora_config,
        "lr": lr,
        "loss": loss,
        "n_steps": n_steps,
        "batch": batch,
        "optimizer": "torch.optim.AdamW (defaults but lr)",
        "other_adapter": other,
    }
    c = case(
        "trajectory",
        f"{name}_{dtype[-2:]}",
        dtype,
        f"an MLP trained {n_steps} steps through warm-up, budgeting, final masking and the final phase ({loss})",
        config,
        seed,
    )
    torch.manual_seed(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    stack = Stack([(n, i, o) for n, i, o, _ in layers], convs=convs).to(torch_dtype)
    stack.loss_name = loss
    model = adalora(stack, **adalora_config)
    if other is not None:
        model.add_adapter("other", peft.AdaLoraConfig(**other))
        model.base_model.set_adapter(["default", "other"])
    inner = model.base_model.model
    for n, _, _, targeted in layers:
        module = getattr(inner, n)
        base = module.get_base_layer() if targeted else getattr(module, "original_module", module)
        c.inputs[f"base.{n}.weight"], c.inputs[f"base.{n}.bias"] = t2n(base.weight), t2n(base.bias)
        for adapter, prefix in (("default", "init"), ("other", "init_other")):
            if targeted and adapter in getattr(module, "lora_A", {}):
                for part in PARTS:
                    c.inputs[f"{prefix}.{n}.{part}"] = t2n(getattr(module, part)[adapter])
    targets = [n for n, *_, targeted in layers if targeted]
    # what trains: the default adapter's tensors and the base parameters its bias / modules_to_save
    # settings free. Never ranknum (in float64 peft leaves it trainable: docs/SPEC.md, "Driving peft"),
    # never the "other" adapter (set_adapter makes every active adapter require grad: a peft quirk).
    trainable = {
        n.removeprefix("base_model.model."): p
        for n, p in model.named_parameters()
        if p.requires_grad and "ranknum" not in n and not n.endswith(".other")
    }
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=lr)
    rng = np.random.default_rng(seed)
    final_step = adalora_config["total_step"] - adalora_config["tfinal"]
    for step in range(1, n_steps + 1):
        x = rng.normal(size=(batch, *sample_shape)).astype(dtype)
        n_out = layers[-1][2]
        target = rng.normal(size=(batch, n_out)).astype(dtype) if loss == "mse" else rng.integers(0, n_out, size=batch)
        c.inputs[f"step{step}.x"], c.inputs[f"step{step}.target"] = x, target
        out = model.base_model(torch.tensor(x), torch.tensor(target))  # base_model: the orthogonal term is added
        out.loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        record(c, tensor(f"step{step}.loss", "loss", step=step), t2n(out.loss))
        if step <= final_step:
            record(
                c,
                exact(f"step{step}.budget", "budget", step=step),
                model.base_model.rankallocator.budget_schedule(step)[0],
            )
        pattern = model.peft_config["default"].rank_pattern
        stripped = None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}
        record(c, exact(f"step{step}.rank_pattern", "rank pattern", step=step), stripped)
        for n in targets:
            E = t2n(lora(getattr(inner, n), "lora_E"))[:, 0]
            record(
                c,
                exact(f"step{step}.E_nonzero.{n}", "non-zero rows of lora_E", step=step, layer=n),
                [bool(v) for v in E != 0],
            )
            record(
                c,
                exact(f"step{step}.ranknum.{n}", "ranknum", step=step, layer=n),
                float(getattr(inner, n).ranknum["default"].detach()),
            )
    for n in targets:
        for part in PARTS:
            record(c, tensor(f"final.{n}.{part}", f"final {part}", layer=n), t2n(lora(getattr(inner, n), part)))
    for key, p in sorted(trainable.items()):
        if "lora_" not in key:
            record(c, tensor(f"final_base.{key}", "final base parameter", layer=key), t2n(p))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
        saved = load_file(str(Path(tmp) / "adapter_model.safetensors"))
    for key in sorted(saved):
        # with bias "all" and modules_to_save peft also saves the wrapper's inner biases
        # (".modules_to_save.bias", ".original_module.bias"): redundant copies, not checked
        if ".original_module." not in key and ".modules_to_save." not in key:
            record(c, tensor(f"saved.{key}", "saved tensor", layer=key), saved[key])
    return c


# ---------------------------------------------------------------------------------------------
# checkpoint: an adapter peft trained and saved (cut to its rank pattern), and peft's outputs after loading


def gen_checkpoint(name: str, seed: int, target_r: int, prune_all_of: str | None) -> tuple[Case, dict[str, bytes]]:
    """Without `prune_all_of` every layer must keep at least one row (checked); with it, that layer's
    pattern is set to all False before saving, so peft saves and loads it with r = 0."""
    layers = [("fc1", 8, 16), ("fc2", 16, 12), ("fc3", 12, 10), ("head", 10, 4)]
    schedule = {"init_r": 4, "target_r": target_r, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
    config = {"layers": [list(layer) for layer in layers], "adalora": schedule}
    c = case("checkpoint", name, "float64", "an adapter trained and saved by peft, loaded, and run", config, seed)
    torch.manual_seed(seed)
    stack = Stack(layers).double()
    base_state = {k: v.clone() for k, v in stack.state_dict().items()}
    model = adalora(stack, target_modules=["fc1", "fc2", "fc3"], **schedule)
    params = [p for n, p in model.named_parameters() if any(part in n for part in PARTS)]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    rng = np.random.default_rng(seed)
    for step in range(1, 13):
        out = model.base_model(torch.tensor(rng.normal(size=(8, 8))), torch.tensor(rng.normal(size=(8, 4))))
        out.loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    if prune_all_of is not None:  # a layer that lost every singular value: saved with r = 0
        key = f"{prune_all_of}.lora_E.default"
        pattern[key] = [False] * len(pattern[key])
    elif not all(any(keep) for keep in pattern.values()):
        raise RuntimeError(f"checkpoint/{name}: a layer lost every row ({pattern}); choose another seed")
    files = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            files[file] = (Path(tmp) / file).read_bytes()
        fresh = Stack(layers).double()
        fresh.load_state_dict(base_state)
        loaded = peft.PeftModel.from_pretrained(fresh, tmp).eval()
    for n, _, _ in layers:
        c.inputs[f"base.{n}.weight"] = t2n(base_state[f"{n}.weight"])
        c.inputs[f"base.{n}.bias"] = t2n(base_state[f"{n}.bias"])
    x = torch.tensor(rng.normal(size=(5, 8)))
    c.inputs["x"] = t2n(x)
    inner = loaded.base_model.model
    for n in ("fc1", "fc2", "fc3"):
        record(c, exact(f"r.{n}", "rank after loading", layer=n), int(lora(getattr(inner, n), "lora_E").shape[0]))
        record(
            c,
            exact(f"ranknum.{n}", "ranknum after loading", layer=n),
            float(getattr(inner, n).ranknum["default"].detach()),
        )
    with torch.no_grad():
        record(c, tensor("y", "output after loading"), t2n(loaded.base_model.model(x).logits))
    return c, files


# ---------------------------------------------------------------------------------------------
# config: which configs peft accepts, what it writes for them, and which it refuses

COMPARE_FIELDS = [
    "peft_type",
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rank_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
]
CONFIG_ENTRIES = [
    {"total_step": 100},
    {
        "total_step": 1000,
        "init_r": 16,
        "target_r": 4,
        "tinit": 100,
        "tfinal": 200,
        "deltaT": 10,
        "lora_alpha": 32,
        "target_modules": ["v", "q"],
    },
    {"total_step": 10, "beta1": 0.5, "beta2": 0.9, "orth_reg_weight": 0.0, "lora_dropout": 0.1},
    {"total_step": 20, "target_modules": "model.*\\.(q|v)"},
    {"total_step": 20, "rank_pattern": {"q.lora_E": [True, False, True]}},
    {},
    {"total_step": 0},
    {"total_step": -5},
    {"total_step": 20, "tinit": 10, "tfinal": 10},
    {"total_step": 20, "tinit": 25},
    {"total_step": 20, "orth_reg_weight": -0.1},
    {"total_step": 20, "use_dora": True},
]


def gen_config(seed: int) -> Case:
    entries = []
    for kwargs in CONFIG_ENTRIES:
        entry: dict[str, Any] = {"kwargs": kwargs, "compare_fields": COMPARE_FIELDS}
        try:
            config = peft.AdaLoraConfig(**kwargs)
        except ValueError as err:
            entry["peft_error"] = str(err)
        else:
            saved = config.to_dict()
            entry["adapter_config"] = {
                k: sorted(v) if isinstance(v, set) else v for k, v in saved.items() if k in COMPARE_FIELDS
            }
            entry["adapter_config"]["peft_type"] = str(saved["peft_type"].value)
        entries.append(entry)
    c = case(
        "config",
        "peft_accepts_and_refuses",
        "float64",
        "configs peft accepts (with what it saves) and refuses",
        {"entries": [{k: v for k, v in e.items() if k != "adapter_config"} for e in entries]},
        seed,
    )
    for i, entry in enumerate(entries):
        record(c, exact(f"entry{i}.valid", "accepted", step=None, layer=f"entry {i}"), "peft_error" not in entry)
        if "adapter_config" in entry:
            record(
                c,
                exact(f"entry{i}.adapter_config", "saved adapter_config fields", layer=f"entry {i}"),
                entry["adapter_config"],
            )
    return c


# ---------------------------------------------------------------------------------------------


def all_cases() -> Iterator[tuple[Case, dict[str, bytes]]]:
    seed = 0
    for dtype in ("float64", "float32"):
        for spec in LAYER_CASES:
            seed += 1
            yield gen_layer(spec[0], dtype, seed, spec), {}
    for dtype in ("float64", "float32"):
        for spec in CONV_LAYER_CASES:
            seed += 1
            yield gen_conv_layer(dtype, 50 + seed, spec), {}
    yield gen_init(True, 101), {}
    yield gen_init(False, 102), {}
    yield gen_orth("basic_f64", "float64", 201, 4, 0.5, False), {}
    yield gen_orth("zero_norm_f64", "float64", 202, 4, 0.1, True), {}
    yield gen_orth("r_zero_f64", "float64", 203, 0, 0.5, False), {}
    yield gen_orth("basic_f32", "float32", 204, 4, 0.5, False), {}
    for spec in SCHEDULES:
        yield gen_schedule(spec, 300), {}
    for i, spec in enumerate(ALLOCATOR_CASES):
        yield gen_allocator(spec, "float64", 400 + i), {}
    yield gen_allocator(ALLOCATOR_CASES[0], "float32", 410), {}
    yield gen_trajectory("mlp_mse", "float64", "mse", 500), {}
    yield gen_trajectory("mlp_cross_entropy", "float64", "cross_entropy", 501), {}
    yield gen_trajectory("mlp_mse", "float32", "mse", 502), {}
    short = {"total_step": 30, "tinit": 3, "tfinal": 6, "deltaT": 2, "init_r": 5, "target_r": 2}
    yield (
        gen_trajectory(
            "bias_all_modules_to_save", "float64", "mse", 503, {**short, "bias": "all", "modules_to_save": ["head"]}
        ),
        {},
    )
    yield gen_trajectory("bias_lora_only", "float64", "mse", 504, {**short, "bias": "lora_only"}), {}
    other = {
        "target_modules": ["fc1", "fc3"],
        "init_r": 3,
        "target_r": 1,
        "total_step": 30,
        "lora_alpha": 16,
        "inference_mode": True,
        "init_lora_weights": False,
    }
    yield gen_trajectory("two_adapters", "float64", "mse", 505, short, other), {}
    cnn = {"layers": CNN_LAYERS, "convs": CNN_CONVS, "sample_shape": CNN_INPUT}
    yield gen_trajectory("cnn", "float64", "mse", 506, short, **cnn), {}
    yield gen_trajectory("cnn_bias_all", "float32", "cross_entropy", 507, {**short, "bias": "all"}, **cnn), {}
    yield gen_checkpoint("trained_and_saved", 600, 3, None)
    yield gen_checkpoint("one_layer_fully_pruned", 601, 2, "fc3")
    yield gen_config(700), {}


def check_margins(c: Case) -> None:
    floor = MARGIN_FLOOR[c.dtype]
    close = {label: m for label, m in c.margins.items() if m < floor}
    if close:
        raise RuntimeError(f"{c.id}: mask decisions within {floor} of flipping at {close}; choose another seed")


def generate(out: Path) -> list[str]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ids = []
    for c, files in all_cases():
        check_margins(c)
        write_case(out, c, files)
        ids.append(c.id)
    write_manifest(out, PROVENANCE)
    return ids


def check(committed: Path) -> int:
    """Regenerate into a temporary directory and compare every case with the committed one."""
    read_manifest(committed)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "cases"
        with contextlib.redirect_stdout(io.StringIO()):
            generate(fresh)
        problems = []
        if case_ids(fresh) != case_ids(committed):
            problems.append(f"case lists differ: {sorted(set(case_ids(fresh)) ^ set(case_ids(committed)))}")
        for case_id in case_ids(fresh):
            if case_id not in case_ids(committed):
                continue
            old, new = read_case(committed, case_id), read_case(fresh, case_id)
            result = compare(old, {**new.expected}, keep=1)
            if not result.passed or old.inputs.keys() != new.inputs.keys():
                problems.append(f"{case_id}: {result.first_failure or 'inputs differ'}")
            elif any(not np.array_equal(old.inputs[k], new.inputs[k]) for k in old.inputs):
                problems.append(f"{case_id}: inputs differ")
    for problem in problems:
        print("golden --check:", problem)
    print(f"golden --check: {len(case_ids(committed))} cases, {len(problems)} differ from a fresh generation")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CASES, help="where to write the cases (default golden/cases)")
    parser.add_argument("--check", action="store_true", help="regenerate to a temporary directory and compare")
    args = parser.parse_args(argv)
    if args.check:
        return check(args.out)
    ids = generate(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(ids)} cases to {args.out} ({size / 1e6:.2f} MB) and {MANIFEST}")
    print(json.dumps(PROVENANCE))
    return 0


if __name__ == "__main__":
    # peft writes target_modules, a set, into adapter_config.json in the set's iteration order,
    # which follows Python's string hashing: fix the hash seed so the files come out byte-identical.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    sys.exit(main())
