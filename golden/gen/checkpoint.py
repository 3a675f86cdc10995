"""checkpoint: an adapter peft trained and saved (cut to its rank pattern), and peft's outputs after
loading it into a fresh base network (docs/SPEC.md 14.8). The case carries peft's two files.

Suite 1.1 adds a network of transformers Conv1D layers (fan_in_fan_out), a CNN, an adapter trained
with lora_alpha = 0 (its scaling recomputed from each layer's rank as loading resizes it), and an
adapter loaded under the name "other" beside a given "default" one, both active."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import peft
import torch

from adalora_ref.conformance.case import Case

from .common import PARTS, Generated, Stack, adalora, case, exact, record, t2n, tensor
from .trajectory import CNN_CONVS, CNN_INPUT

MLP_LAYERS = [("fc1", 8, 16), ("fc2", 16, 12), ("fc3", 12, 10), ("head", 10, 4)]
CNN_LAYERS = [("conv1", 3, 4), ("conv2", 4, 6), ("fc1", 48, 10), ("head", 10, 4)]
DEFAULT_ADAPTER = {  # the adapter a model already has when "other" is loaded beside it
    "target_modules": ["fc1", "fc3"],
    "init_r": 3,
    "target_r": 1,
    "total_step": 12,
    "lora_alpha": 16,
    "inference_mode": True,
    "init_lora_weights": False,
}


def cases() -> Generated:
    yield gen_checkpoint("trained_and_saved", 600, 3, None)
    yield gen_checkpoint("one_layer_fully_pruned", 601, 2, "fc3")
    yield gen_checkpoint("fan_in_fan_out", 602, 2, None, overrides={"fan_in_fan_out": True})
    yield gen_checkpoint("cnn", 603, 2, None, layers=CNN_LAYERS, convs=CNN_CONVS, sample_shape=CNN_INPUT)
    # 604: a layer lost every row
    yield gen_checkpoint("alpha_zero", 605, 2, None, overrides={"lora_alpha": 0})
    yield gen_checkpoint("second_adapter", 606, 2, None, beside=DEFAULT_ADAPTER)


def gen_checkpoint(
    name: str,
    seed: int,
    target_r: int,
    prune_all_of: str | None,
    *,
    layers: list[tuple[str, int, int]] = MLP_LAYERS,
    convs: dict[str, dict] | None = None,
    sample_shape: tuple[int, ...] = (8,),
    overrides: dict | None = None,
    beside: dict | None = None,
) -> tuple[Case, dict[str, bytes]]:
    """Without `prune_all_of` every layer must keep at least one row (checked); with it, that layer's
    pattern is set to all False before saving, so peft saves and loads it with r = 0. `overrides`
    change the adapter's config (`fan_in_fan_out` builds every layer as a transformers Conv1D);
    `layers`, `convs`, `sample_shape` give another network; with `beside`, the saved adapter is
    loaded as "other" into a model that has a "default" adapter of that config, both active.
    Every layer but `head` is targeted."""
    schedule = {"init_r": 4, "target_r": target_r, "tinit": 2, "tfinal": 3, "deltaT": 2, "total_step": 12}
    config = {"layers": [list(layer) for layer in layers], "adalora": {**schedule, **(overrides or {})}}
    if convs:
        config["conv"], config["sample_shape"] = convs, list(sample_shape)
    if beside:
        config["default_adapter"], config["adapter_name"] = beside, "other"
    c = case("checkpoint", name, "float64", "an adapter trained and saved by peft, loaded, and run", config, seed)
    torch.manual_seed(seed)
    conv1d = bool((overrides or {}).get("fan_in_fan_out"))
    stack = Stack(layers, convs=convs, conv1d=conv1d).double()
    base_state = {k: v.clone() for k, v in stack.state_dict().items()}
    targets = [n for n, _, _ in layers if n != "head"]
    model = adalora(stack, target_modules=targets, **config["adalora"])
    params = [p for n, p in model.named_parameters() if any(part in n for part in PARTS)]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    rng = np.random.default_rng(seed)
    for step in range(1, 13):
        x, target = rng.normal(size=(8, *sample_shape)), rng.normal(size=(8, 4))
        out = model.base_model(torch.tensor(x), torch.tensor(target))
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
        fresh = Stack(layers, convs=convs, conv1d=conv1d).double()
        fresh.load_state_dict(base_state)
        if beside:
            loaded = adalora(fresh, **beside)
            loaded.load_adapter(tmp, adapter_name="other")
            loaded.base_model.set_adapter(["default", "other"])
            loaded.eval()
        else:
            loaded = peft.PeftModel.from_pretrained(fresh, tmp).eval()
    for n, _, _ in layers:
        c.inputs[f"base.{n}.weight"] = t2n(base_state[f"{n}.weight"])
        c.inputs[f"base.{n}.bias"] = t2n(base_state[f"{n}.bias"])
    inner = loaded.base_model.model
    if beside:  # the adapter the model had before "other" came
        for n in beside["target_modules"]:
            for part in PARTS:
                c.inputs[f"default.{n}.{part}"] = t2n(getattr(getattr(inner, n), part)["default"])
    x = torch.tensor(rng.normal(size=(5, *sample_shape)))
    c.inputs["x"] = t2n(x)
    adapter = "other" if beside else "default"
    for n in targets:
        module = getattr(inner, n)
        record(c, exact(f"r.{n}", "rank after loading", layer=n), int(module.lora_E[adapter].shape[0]))
        record(c, exact(f"ranknum.{n}", "ranknum after loading", layer=n), float(module.ranknum[adapter].detach()))
        if overrides or convs or beside:  # suite 1.1's cases check the scaling too
            record(c, exact(f"scaling.{n}", "scaling after loading", layer=n), module.scaling[adapter])
    with torch.no_grad():
        record(c, tensor("y", "output after loading"), t2n(loaded.base_model.model(x).logits))
    return c, files
