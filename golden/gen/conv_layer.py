"""conv_layer: SVDConv2d's forward, the four gradients, delta weight (a kernel), merge and unmerge
(docs/SPEC.md 14.2), driven as the layer kind drives SVDLinear (its `disable_and_safe_merge` and
`safe_merge_refused` cases too)."""

from __future__ import annotations

import torch

from adalora_ref.conformance.case import Case

from .common import TORCH_DTYPES, Generated, Stack, adalora, case
from .layer import driven_layer, layer_inputs, refused_safe_merge

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
FIRST_SEED = 69  # seeds 69.. (after the layer cases' 1..18)


OPERATIONS = (
    "disable_and_safe_merge",
    {"in_channels": 3, "out_channels": 4, "kernel_size": 2},
    3,
    8,
    True,
    (2, 3, 5, 4),
    0.0,
)
MORE_CONV_LAYER_CASES = [  # suite 1.1, from the mutation run's blind spots (mutation/survivors.toml); seeds 85..92
    # 'same' with totals (1, 0): only H padded, by 0 before and 1 after
    (
        "same_padding_2x1",
        {"in_channels": 2, "out_channels": 3, "kernel_size": (2, 1), "padding": "same"},
        2,
        8,
        True,
        (2, 2, 4, 5),
        0.0,
    ),
    # 'same' with totals (0, 2): only W padded, 1 on each side
    (
        "same_padding_1x3",
        {"in_channels": 2, "out_channels": 3, "kernel_size": (1, 3), "padding": "same"},
        2,
        8,
        False,
        (2, 2, 4, 5),
        0.0,
    ),
    # an unbatched input with dropout, and an output of height 1 (the padded height equals the kernel's)
    (
        "unbatched_dropout",
        {"in_channels": 3, "out_channels": 2, "kernel_size": (5, 2), "padding": "valid"},
        2,
        8,
        True,
        (3, 5, 5),
        0.25,
    ),
    # 'same' with totals (0, 1): only W padded, by 0 left and 1 right
    (
        "same_padding_1x2",
        {"in_channels": 2, "out_channels": 3, "kernel_size": (1, 2), "padding": "same"},
        2,
        8,
        True,
        (2, 2, 4, 5),
        0.0,
    ),
]
REFUSED = ("safe_merge_refused", {"in_channels": 3, "out_channels": 4, "kernel_size": 2}, 3, 8, True, (2, 3, 5, 4), 0.0)


def cases() -> Generated:
    seed = FIRST_SEED
    for dtype in ("float64", "float32"):
        for spec in CONV_LAYER_CASES:
            yield gen_conv_layer(dtype, seed, spec), {}
            seed += 1
    yield gen_conv_layer("float64", 81, OPERATIONS, operations=True), {}
    yield gen_conv_layer("float32", 82, OPERATIONS, operations=True), {}
    yield gen_conv_layer("float64", 83, REFUSED, refused=True), {}
    yield gen_conv_layer("float32", 84, REFUSED, refused=True), {}
    seed = 85
    for spec in MORE_CONV_LAYER_CASES:
        for dtype in ("float64", "float32"):
            yield gen_conv_layer(dtype, seed, spec), {}
            seed += 1


def gen_conv_layer(dtype: str, seed: int, spec: tuple, *, operations: bool = False, refused: bool = False) -> Case:
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
    if refused:
        del config["input_shape"]  # no forward: the case only merges
        config["safe_merge_only"] = True
        description = "SVDConv2d merge(safe_merge=True) refused: the delta weight (a kernel) overflows"
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
    if refused:
        refused_safe_merge(c, layer, dtype, kernel=True)
        return c
    layer_inputs(c, layer)
    x = torch.randn(*input_shape, dtype=TORCH_DTYPES[dtype], requires_grad=True)
    with torch.no_grad():
        out_shape = layer.get_base_layer()(x).shape
    grad_y = torch.randn(*out_shape, dtype=TORCH_DTYPES[dtype])
    driven_layer(c, model, layer, x, grad_y, p, seed, kernel=True, operations=operations)
    return c
