"""trajectory: a small network trained with torch's AdamW through warm-up, budgeting, final masking
and the final phase, the orthogonal term on (docs/SPEC.md 14.7). Per step: the loss, the budget,
the rank pattern, each layer's surviving rows and ranknum; at the end every parameter and what peft
saves."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import peft
import torch
from safetensors.numpy import load_file

from adalora_ref.conformance.case import Case

from .common import PARTS, TORCH_DTYPES, Generated, Stack, adalora, case, exact, lora, record, t2n, tensor

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

SHORT = {"total_step": 30, "tinit": 3, "tfinal": 6, "deltaT": 2, "init_r": 5, "target_r": 2}
OTHER_ADAPTER = {  # an inference-mode adapter "other", active together with "default"
    "target_modules": ["fc1", "fc3"],
    "init_r": 3,
    "target_r": 1,
    "total_step": 30,
    "lora_alpha": 16,
    "inference_mode": True,
    "init_lora_weights": False,
}
CNN = {"layers": CNN_LAYERS, "convs": CNN_CONVS, "sample_shape": CNN_INPUT}


def cases() -> Generated:
    yield gen_trajectory("mlp_mse", "float64", "mse", 500), {}
    yield gen_trajectory("mlp_cross_entropy", "float64", "cross_entropy", 501), {}
    yield gen_trajectory("mlp_mse", "float32", "mse", 502), {}
    bias_all = {**SHORT, "bias": "all", "modules_to_save": ["head"]}
    yield gen_trajectory("bias_all_modules_to_save", "float64", "mse", 503, bias_all), {}
    yield gen_trajectory("bias_lora_only", "float64", "mse", 504, {**SHORT, "bias": "lora_only"}), {}
    yield gen_trajectory("two_adapters", "float64", "mse", 505, SHORT, OTHER_ADAPTER), {}
    yield gen_trajectory("cnn", "float64", "mse", 506, SHORT, **CNN), {}
    yield gen_trajectory("cnn_bias_all", "float32", "cross_entropy", 507, {**SHORT, "bias": "all"}, **CNN), {}


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
