"""trajectory: a small network trained with torch's AdamW through warm-up, budgeting, final masking
and the final phase, the orthogonal term on (docs/SPEC.md 14.7). Per step: the loss, the budget,
the rank pattern, each layer's surviving rows and ranknum; at the end every parameter and what peft
saves. A case that localises (`localise=True`) also checks, per step, the task loss and the
orthogonal term apart; at every masking step the importance state, the scores and the threshold;
and at the phase boundaries every trained parameter as the optimizer step left it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from safetensors.numpy import load_file

from adalora_ref.conformance.case import Case

from .allocator import capture_kthvalue, record_importance, record_scores
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
# conv2 frozen between two adapted layers: its forward and its input gradient (down to conv1) run
FROZEN_CONV = {**CNN, "layers": [("conv1", 3, 4, True), ("conv2", 4, 6, False), ("fc1", 48, 10, True), CNN_LAYERS[3]]}


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
    # the cases that localise (suite 1.1), float64 only: in float32 the importance and the parameters of
    # a trained network carry errors up to ~6e-5 relative (cancellation in small gradients), too near
    # float32's 1e-4 tolerance to judge a port by
    yield gen_trajectory("localised_mlp_mse", "float64", "mse", 508, localise=True), {}
    from_0 = {**SHORT, "tinit": 0}  # update_and_allocate(0) first; warm-up is step 0 alone
    yield gen_trajectory("from_step_0", "float64", "mse", 509, from_0, first_step=0, localise=True), {}
    yield gen_trajectory("orth_zero", "float64", "mse", 510, {**SHORT, "orth_reg_weight": 0.0}, localise=True), {}
    yield gen_trajectory("dropout", "float64", "mse", 511, {**SHORT, "lora_dropout": 0.25}, localise=True), {}
    fan = {**SHORT, "fan_in_fan_out": True}  # every layer a transformers Conv1D: weights (in, out)
    yield gen_trajectory("fan_in_fan_out", "float64", "cross_entropy", 512, fan, localise=True), {}
    yield gen_trajectory("cnn_frozen_conv", "float64", "mse", 513, SHORT, **FROZEN_CONV), {}
    # AdamW's edge values (suite 1.2, the mutation run's last optimizer blind spots): lr 0 and weight
    # decay 0 (nothing moves: only masking changes E), then beta1 0, eps 0 and weight decay 1
    frozen = {"lr": 0.0, "weight_decay": 0.0}
    yield gen_trajectory("adamw_lr_zero", "float64", "mse", 514, SHORT, adamw=frozen), {}
    edges = {"betas": (0.0, 0.9), "eps": 0.0, "weight_decay": 1.0}
    yield gen_trajectory("adamw_edges", "float64", "mse", 515, SHORT, localise=True, adamw=edges), {}


def phase_boundaries(adalora_config: dict, first: int, last: int) -> list[int]:
    """The first and last step, the last warm-up step and the first budgeting one, the final masking and
    the first step after it, and total_step: where a phase begins or ends, within [first, last]."""
    tinit, final = adalora_config["tinit"], adalora_config["total_step"] - adalora_config["tfinal"]
    steps = {first, tinit, tinit + 1, final, final + 1, adalora_config["total_step"], last}
    return sorted(s for s in steps if first <= s <= last)


class RecordingDropout(torch.nn.Module):
    """peft's lora_dropout, keeping its mask: torch's dropout of ones (each entry 0 or 1 / (1 - p)) times
    the input, which is what torch's dropout of the input computes."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mask = torch.nn.functional.dropout(torch.ones_like(x), self.p, self.training)
        return x * self.mask


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
    first_step: int = 1,
    localise: bool = False,
    adamw: dict | None = None,
) -> Case:
    """`overrides` change the adapter's config (bias modes, modules_to_save, a shorter schedule;
    `fan_in_fan_out` builds every layer as a transformers Conv1D; `lora_dropout` records each step's
    masks as inputs); `other` adds an inference-mode adapter "other", active together with "default";
    `layers`, `convs` and `sample_shape` give another network (a CNN: conv layers, a flatten, linear
    layers). The steps run from `first_step` (said in the config when not 1); `localise` adds the
    checks that localise a divergence (module docstring). `adamw` sets torch's AdamW arguments (lr,
    betas, eps, weight_decay; torch's defaults and lr 0.02 for those it does not name): the config then
    states all four under "adamw"."""
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
    optimizer_args = {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, **(adamw or {})}
    lr, batch = optimizer_args["lr"], 16
    n_steps = adalora_config["total_step"] + 6
    steps = range(first_step, first_step + n_steps)
    after_optimizer = phase_boundaries(adalora_config, steps[0], steps[-1]) if localise else []
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
    if adamw is not None:
        config["optimizer"] = "torch.optim.AdamW (lr, betas, eps and weight_decay from the config)"
        config["adamw"] = {k: list(v) if k == "betas" else v for k, v in optimizer_args.items() if k != "lr"}
    if first_step != 1:
        config["first_step"] = first_step
    if after_optimizer:
        config["after_optimizer_steps"] = after_optimizer
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
    conv1d = adalora_config.get("fan_in_fan_out", False)
    stack = Stack([(n, i, o) for n, i, o, _ in layers], convs=convs, conv1d=conv1d).to(torch_dtype)
    stack.loss_name = loss
    model = adalora(stack, **adalora_config)
    dropouts = {}
    if adalora_config.get("lora_dropout", 0.0) > 0:
        for n, *_, targeted in layers:
            if targeted:
                dropouts[n] = RecordingDropout(adalora_config["lora_dropout"])
                getattr(model.base_model.model, n).lora_dropout["default"] = dropouts[n]
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
    optimizer = torch.optim.AdamW(list(trainable.values()), **optimizer_args)
    rng = np.random.default_rng(seed)
    allocator = model.base_model.rankallocator
    final_step = adalora_config["total_step"] - adalora_config["tfinal"]
    for step in steps:
        x = rng.normal(size=(batch, *sample_shape)).astype(dtype)
        n_out = layers[-1][2]
        target = rng.normal(size=(batch, n_out)).astype(dtype) if loss == "mse" else rng.integers(0, n_out, size=batch)
        c.inputs[f"step{step}.x"], c.inputs[f"step{step}.target"] = x, target
        x_t, target_t, keep = torch.tensor(x), torch.tensor(target), step in after_optimizer
        out, params, captured = peft_step(model, optimizer, trainable, step, x_t, target_t, keep)
        for n, dropout in dropouts.items():  # the masks this step's forward drew
            c.inputs[f"step{step}.dropout_mask.{n}"] = t2n(dropout.mask)
        if localise:  # the model's own loss, then what peft's AdaLoraModel.forward added to it
            task = stack.task_loss
            record(c, tensor(f"step{step}.task_loss", "task loss", step=step), t2n(task))
            orth_term = tensor(f"step{step}.orth_loss", "orthogonal term (orth_reg_weight * R)", step=step)
            record(c, orth_term, t2n(out.loss - task))
        record(c, tensor(f"step{step}.loss", "loss", step=step), t2n(out.loss))
        if params:
            record_after_optimizer(c, step, params, targets)
        budget, mask_ind = allocator.budget_schedule(step)
        masked = step <= final_step and (bool(mask_ind) or step == final_step)
        if localise and masked and step < final_step:  # the final masking resets the importance
            record_importance(c, step, allocator, targets)
        if step <= final_step:
            record(c, exact(f"step{step}.budget", "budget", step=step), budget)
        if localise and masked:
            record_scores(c, step, captured, [(n, lora(getattr(inner, n), "lora_E").shape[0]) for n in targets])
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


def peft_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainable: dict,
    step: int,
    x: torch.Tensor,
    target: torch.Tensor,
    keep_params: bool,
) -> tuple[Any, dict[str, np.ndarray], list]:
    """One training step in peft's call order (docs/SPEC.md 7.2): the forward through base_model (the
    orthogonal term added to the loss), backward, AdamW's step, update_and_allocate(step), zero_grad.
    Returns the forward's output, every trained parameter as the optimizer step left it (when
    `keep_params`, else {}), and the kthvalue calls of the masking."""
    out = model.base_model(x, target)
    out.loss.backward()
    optimizer.step()
    params = {key: t2n(p) for key, p in sorted(trainable.items())} if keep_params else {}
    captured: list = []
    with capture_kthvalue(captured):
        model.base_model.update_and_allocate(step)
    optimizer.zero_grad()
    return out, params, captured


def record_after_optimizer(c: Case, step: int, params: dict[str, np.ndarray], targets: list[str]) -> None:
    """Every trained parameter as the optimizer step left it (before update_and_allocate): the
    adapter's, layer by layer in A, E, B order, then the base parameters in sorted order."""
    at = f"step{step}.after_optimizer"
    for n in targets:
        for part in PARTS:
            check = tensor(f"{at}.{n}.{part}", f"{part} after the optimizer step", step=step, layer=n)
            record(c, check, params[f"{n}.{part}.default"])
    for key in params:
        if "lora_" not in key:
            check = tensor(f"{at}.{key}", "base parameter after the optimizer step", step=step, layer=key)
            record(c, check, params[key])
