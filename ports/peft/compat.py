"""The API differences between peft releases (0.4.0 .. 0.21.2), each mapped in one small function.

Every function here calls the installed release's own API; none changes what the release computes.
Where a release has no way to express a case, `unsupported_reason` says why (an API absence, never a
numeric difference). ports/README.md lists every mapping with the releases it applies to.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import tempfile
from pathlib import Path
from typing import Any

import peft
import torch

from adalora_ref.conformance.case import Case


def release() -> str:
    return peft.__version__


def version() -> tuple[int, ...]:
    return tuple(int(part) for part in peft.__version__.split(".")[:3] if part.isdigit())


def with_model_config(model: torch.nn.Module) -> torch.nn.Module:
    """0.4's AdaLoraModel reads `model.config` (a transformers model's) with no default, where its own
    LoraModel and every later release take `{"model_type": "custom"}` for a model without one: a plain
    torch model gets that default as its `config` (only on 0.4)."""
    if version() < (0, 5) and not hasattr(model, "config"):
        model.config = {"model_type": "custom"}
    return model


def adalora(model: torch.nn.Module, **config: Any) -> Any:
    """golden/gen's `adalora` (get_peft_model with an AdaLoraConfig) on a model the release accepts."""
    from gen.common import adalora as get_adalora

    return get_adalora(with_model_config(model), **config)


def base_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The frozen layer an adapter wraps: `get_base_layer()` (0.7 on); before it the SVD layer itself
    subclasses torch.nn.Linear and holds `weight` and `bias`."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def config_fields() -> set[str]:
    """The fields the release's AdaLoraConfig has."""
    return {f.name for f in dataclasses.fields(peft.AdaLoraConfig)}


def has_conv2d() -> bool:
    """Whether the release adapts torch.nn.Conv2d with AdaLoRA (SVDConv2d; 0.21 has it)."""
    from peft.tuners import adalora

    return hasattr(adalora, "SVDConv2d") or hasattr(getattr(adalora, "layer", None), "SVDConv2d")


def has_safe_merge() -> bool:
    """Whether SVDLinear.merge takes `safe_merge` (0.6 on)."""
    from peft.tuners.adalora import SVDLinear

    return "safe_merge" in inspect.signature(SVDLinear.merge).parameters


def has_multiple_active_adapters() -> bool:
    """Whether several adapters can be active at once (`BaseTunerLayer.active_adapters`, 0.6 on)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return "active_adapters" in dir(BaseTunerLayer)


def grad_of(param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient; torch leaves `.grad` None for one the forward did not use (0.5 skips
    the adapter of a layer with r = 0), whose gradient is zero."""
    return param.grad if param.grad is not None else torch.zeros_like(param)


def delta_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The adapter's delta weight: `get_delta_weight` (0.6 on); before it (0.4, 0.5) the release has no
    such function, and the delta is what its own `merge` adds to the weight (merged minus before)."""
    if hasattr(layer, "get_delta_weight"):
        return layer.get_delta_weight("default")
    weight = base_layer(layer).weight
    before = weight.detach().clone()
    layer.merge()
    delta = weight.detach() - before
    layer.unmerge()
    return delta


def update_layer(module: torch.nn.Module, r: int, lora_alpha: float, config: Any) -> None:
    """Rebuild the adapter "default" of `module` at rank `r`: `update_layer(name, r, lora_alpha,
    config=...)` (0.18 on) or `update_layer(name, r, lora_alpha, lora_dropout, init_lora_weights)`."""
    parameters = inspect.signature(module.update_layer).parameters
    if "config" in parameters:
        module.update_layer("default", r, lora_alpha, config=config)
    else:
        module.update_layer("default", r, lora_alpha, config.lora_dropout, config.init_lora_weights)


def loadable_adapter(saved: Path, into: Path) -> Path:
    """A copy of the saved adapter in `into` whose adapter_config.json keeps only the fields the release's
    AdaLoraConfig has: older releases refuse a config with a field they do not know (TypeError)."""
    import json

    shutil.copytree(saved, into, dirs_exist_ok=True)
    path = into / "adapter_config.json"
    config = json.loads(path.read_text())
    known = config_fields() | {"peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode"}
    path.write_text(json.dumps({k: v for k, v in config.items() if k in known}))
    return into


def save_adapter(model: Any) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes for "default", in the release's default format:
    adapter_model.safetensors (0.6 on) or adapter_model.bin (before; 0.5's safetensors writer refuses
    the tied biases of bias "all" with modules_to_save)."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        parameters = inspect.signature(model.save_pretrained).parameters
        kwargs: dict[str, Any] = {"selected_adapters": ["default"]} if "selected_adapters" in parameters else {}
        model.save_pretrained(tmp, **kwargs)
        files = {p.name: p for p in Path(tmp).rglob("adapter_model.*")}
        if "adapter_model.safetensors" in files:
            return load_file(str(files["adapter_model.safetensors"]))
        return torch.load(files["adapter_model.bin"], map_location="cpu")


def _uses_conv(case: Case) -> bool:
    if case.kind == "conv_layer":
        return True
    return bool(case.config.get("conv"))


def unsupported_reason(case: Case) -> str | None:
    """Why the installed release cannot express `case` at all (an API it lacks), or None."""
    version = release()
    if _uses_conv(case) and not has_conv2d():
        return f"peft {version} has no AdaLoRA layer for torch.nn.Conv2d (SVDConv2d)"
    merges_safely = case.config.get("safe_merge_only") or case.id.split("/")[1].startswith("disable_and_safe_merge")
    if merges_safely and not has_safe_merge():
        return f"peft {version}: SVDLinear.merge takes no safe_merge"
    several = case.config.get("other_adapter") or case.config.get("default_adapter")
    if several and not has_multiple_active_adapters():
        return f"peft {version} has no several active adapters (set_adapter takes one name)"
    if case.kind == "targeting":
        used = {k for entry in case.config["entries"] for k in entry["kwargs"]}
        missing = sorted(used - config_fields())
        if missing:
            return f"peft {version}: AdaLoraConfig has no {', '.join(missing)}"
    return None
