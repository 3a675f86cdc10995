"""layer: SVDLinear's forward, the four gradients, delta weight, merge and unmerge (docs/SPEC.md 14.1);
the `disable_and_safe_merge` cases (suite 1.1) then the forward with the adapters disabled, a safe
merge and the merged layer's forward; the `safe_merge_refused` cases (suite 1.1) only a safe merge
that peft refuses, its adapter scaled until the delta weight overflows.

`driven_layer` (inputs in, one forward and backward, every output recorded) and `refused_safe_merge`
serve conv_layer too.
"""

from __future__ import annotations

import peft
import torch

from adalora_ref.conformance.case import Case

from .common import PARTS, TORCH_DTYPES, Generated, Stack, adalora, case, exact, lora, record, t2n, tensor

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


OPERATIONS = ("disable_and_safe_merge", 10, 7, 3, False, True, 8, (4,), 0.0)
REFUSED = ("safe_merge_refused", 10, 7, 3, False, True, 8, (4,), 0.0)
# lora_A, lora_E and lora_B each scaled by this: B @ (A * E) overflows (~1e45 in float32, ~1e330 in
# float64) while every input stays finite, so peft's merge(safe_merge=True) refuses the merged weight
OVERFLOW = {"float64": 1e110, "float32": 1e15}
MORE_LAYER_CASES = [  # suite 1.1, from the mutation run's blind spots (mutation/survivors.toml); seeds 23..26
    ("alpha_half", 9, 7, 3, False, True, 0.5, (4,), 0.0),  # 0 < lora_alpha <= 1: scaling is lora_alpha itself
    ("one_feature", 1, 1, 2, False, True, 8, (5,), 0.0),  # in_features = out_features = 1
]


def cases() -> Generated:
    seed = 0
    for dtype in ("float64", "float32"):
        for spec in LAYER_CASES:
            seed += 1
            yield gen_layer(spec[0], dtype, seed, spec), {}
    yield gen_layer(OPERATIONS[0], "float64", 19, OPERATIONS, operations=True), {}
    yield gen_layer(OPERATIONS[0], "float32", 20, OPERATIONS, operations=True), {}
    yield gen_layer(REFUSED[0], "float64", 21, REFUSED, refused=True), {}
    yield gen_layer(REFUSED[0], "float32", 22, REFUSED, refused=True), {}
    seed = 22
    for spec in MORE_LAYER_CASES:
        for dtype in ("float64", "float32"):
            seed += 1
            yield gen_layer(spec[0], dtype, seed, spec), {}


def gen_layer(
    name: str, dtype: str, seed: int, spec: tuple, *, operations: bool = False, refused: bool = False
) -> Case:
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
    description = f"SVDLinear forward, backward and merge: {name}"
    if refused:
        del config["input_shape"]  # no forward: the case only merges
        config["safe_merge_only"] = True
        description = "SVDLinear merge(safe_merge=True) refused: the delta weight overflows"
    c = case("layer", f"{name}_{dtype[-2:]}", dtype, description, config, seed)
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
    if refused:
        refused_safe_merge(c, layer, dtype, kernel=False)
        return c
    layer_inputs(c, layer)
    x = torch.randn(*lead, n_in, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    grad_y = torch.randn(*lead, n_out, dtype=TORCH_DTYPES[dtype])
    driven_layer(c, model, layer, x, grad_y, p, seed, kernel=False, operations=operations)
    return c


def layer_inputs(c: Case, layer: torch.nn.Module) -> None:
    """The base weight (and bias) and the adapter's triplet, as the case's inputs."""
    base = layer.get_base_layer()
    c.inputs["weight"] = t2n(base.weight)
    if base.bias is not None:
        c.inputs["bias"] = t2n(base.bias)
    for part in PARTS:
        c.inputs[part] = t2n(lora(layer, part))


def refused_safe_merge(c: Case, layer: torch.nn.Module, dtype: str, *, kernel: bool) -> None:
    """The adapter scaled by OVERFLOW (the case's inputs), then `merge(safe_merge=True)` on the fresh
    layer: peft refuses it with a ValueError and leaves the base weight and the merged flag alone."""
    with torch.no_grad():
        for part in PARTS:
            lora(layer, part).mul_(OVERFLOW[dtype])
    layer_inputs(c, layer)
    base = layer.get_base_layer()
    try:
        layer.merge(safe_merge=True)
    except ValueError:
        refused = True
    else:
        raise RuntimeError(f"{c.id}: peft merged the overflowing adapter; scale it further")
    word = "kernel" if kernel else "weight"
    record(c, exact("safe_merge_refused", "safe merge refused"), refused)
    record(c, exact("merged", "merged flag after the refused safe merge"), layer.merged)
    record(c, tensor("weight_after_refused_merge", f"base {word} after the refused safe merge"), t2n(base.weight))


def driven_layer(
    c: Case,
    model: peft.PeftModel,
    layer: torch.nn.Module,
    x: torch.Tensor,
    grad_y: torch.Tensor,
    p: float,
    seed: int,
    *,
    kernel: bool,
    operations: bool = False,
) -> None:
    """One forward (with peft's dropout mask when p > 0) and backward of `layer`, then its delta
    weight, merge and unmerge: every output recorded. `kernel`: the base weight is a conv kernel.
    `operations`: then the forward with the adapters disabled, `merge(safe_merge=True)` and the
    merged layer's forward (peft's layer runs only its base layer when disabled or merged)."""
    base = layer.get_base_layer()
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
    delta = "delta weight (a kernel)" if kernel else "delta weight"
    record(c, tensor("delta_weight", delta), t2n(layer.get_delta_weight("default")))
    word = "kernel" if kernel else "weight"
    layer.merge()
    record(c, tensor("merged_weight", f"merged base {word}"), t2n(base.weight))
    layer.unmerge()
    record(c, tensor("unmerged_weight", f"unmerged base {word}"), t2n(base.weight))
    if operations:
        with torch.no_grad():
            layer.enable_adapters(False)
            record(c, tensor("y_disabled", "output y with the adapters disabled"), t2n(layer(x)))
            layer.enable_adapters(True)
            layer.merge(safe_merge=True)
            record(c, tensor("safe_merged_weight", f"base {word} after merge(safe_merge=True)"), t2n(base.weight))
            record(c, tensor("y_merged", "output y of the merged layer"), t2n(layer(x)))
