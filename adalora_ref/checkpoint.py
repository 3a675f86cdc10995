"""Checkpoints in peft's adapter format: adapter_config.json + adapter_model.safetensors.

What peft 0.21.2's `save_pretrained` writes for an AdaLoRA adapter, and so what we write and read:
- tensor keys `base_model.model.<module>.lora_A` / `.lora_B` / `.lora_E` (the adapter name
  stripped), never ranknum; safetensors metadata {"format": "pt"};
- when the config has a rank pattern (keys `<module>.lora_E`), A and E keep only the rows whose
  flag is true and B only the matching columns; a tensor that already has the kept size is
  written as it is;
- `inference_mode: true` in the saved config.
Loading builds the model with init_r everywhere, resizes each layer to its kept rows (keeping the
old ranknum, so the scale stays that of init_r, as peft) and copies the tensors in.

Writes are atomic for the checkpoint as a whole: both files are written and fsynced in a fresh
sibling directory, which then takes the target's name by rename. If the target existed it is
first renamed aside to `<dir>.old-<random>` and removed after the swap (other files in it are
carried over), so a crash leaves the old checkpoint or the new one, never a mix of the two.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from ._backend import device_of, from_numpy, namespace, to_numpy
from .config import AdaLoraConfig
from .layer import SVDTriplet
from .model import E_SUFFIX, AdaLoraModel, BaseLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PARTS = ("lora_A", "lora_E", "lora_B")


def adapter_state_dict(model: AdaLoraModel, adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """The tensors peft would save for the adapter (default: the trainable one), cut to its rank pattern."""
    pattern = model.layer_rank_pattern(adapter_name)
    out: dict[str, np.ndarray] = {}
    for name, triplet in model.triplets(adapter_name).items():
        A, E, B = (to_numpy(getattr(triplet, p)) for p in PARTS)
        keep = pattern.get(name)
        if keep is not None:
            rows = np.flatnonzero(np.asarray(keep, dtype=bool))
            if len(rows) != A.shape[0]:  # peft cuts only tensors that still have their full rank
                A, E = A[rows], E[rows]
            if len(rows) != B.shape[1]:
                B = B[:, rows]
        for part, value in zip(PARTS, (A, E, B), strict=True):
            out[f"{KEY_PREFIX}{name}.{part}"] = np.ascontiguousarray(value)
    name = adapter_name or model.trainable_adapter_name or next(iter(model.peft_config))
    for key, value in model.base_params(name).items():
        out[saved_key(key, name)] = np.ascontiguousarray(to_numpy(value))
    return out


def saved_key(name: str, adapter_name: str) -> str:
    """The key peft saves a trainable base parameter under: "base_model.model." + its name, with a
    modules_to_save copy's ".modules_to_save.<adapter>" dropped ("head.modules_to_save.default.weight"
    is saved as "base_model.model.head.weight")."""
    return KEY_PREFIX + name.replace(f".modules_to_save.{adapter_name}.", ".")


def _is_redundant_peft_copy(key: str) -> bool:
    """With bias "all" and modules_to_save, peft also saves the wrapper's inner biases
    ("head.modules_to_save.bias", "head.original_module.bias"); loading ignores them, as peft does."""
    return ".original_module." in key or ".modules_to_save." in key


def save_adapter(model: AdaLoraModel, directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
    """Write one adapter of `model` (default: the trainable one) in peft's format to `directory`,
    created or replaced atomically. (peft's save_pretrained puts the adapter "default" in the
    directory itself and any other adapter in a subdirectory named after it: pass that path.)"""
    target = Path(directory)
    name = adapter_name or model.trainable_adapter_name or next(iter(model.peft_config))
    if name not in model.peft_config:
        raise ValueError(f"no adapter named {name!r}; adapters are {list(model.peft_config)}")
    config_dict = model.peft_config[name].to_dict()
    config_dict["inference_mode"] = True
    files = {
        CONFIG_NAME: (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode(),
        WEIGHTS_NAME: save_safetensors_bytes(adapter_state_dict(model, name), metadata={"format": "pt"}),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if target.is_dir():
            for other in target.iterdir():  # keep whatever else lives there (a README, ...)
                if other.name not in files and other.is_file():
                    shutil.copy2(other, staging / other.name)
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap_into_place(staging: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f"{target.name}.old-", dir=target.parent))
        os.rmdir(aside)
        os.rename(target, aside)
    os.rename(staging, target)
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def read_adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an adapter_model.safetensors file; errors name the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (an adapter checkpoint needs {WEIGHTS_NAME})") from None
    try:
        return load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None


def read_adapter(directory: str | os.PathLike[str]) -> tuple[AdaLoraConfig, dict[str, np.ndarray]]:
    """The config and tensors of a saved adapter; errors name the file."""
    root = Path(directory)
    return AdaLoraConfig.load_json(root / CONFIG_NAME), read_adapter_tensors(root / WEIGHTS_NAME)


def load_adapter(
    directory: str | os.PathLike[str],
    base_layers: Mapping[str, BaseLayer],
    *,
    adapter_name: str = "default",
    inference_mode: bool | None = None,
) -> AdaLoraModel:
    """An AdaLoraModel over `base_layers` with the adapter saved in `directory` (by peft or by us).

    The saved config's inference_mode is true (peft writes it so); pass inference_mode=False to
    continue training. Every problem is a ValueError naming the file and the key.
    """
    config, tensors = read_adapter(directory)
    if inference_mode is not None:
        config.inference_mode = inference_mode
    model = AdaLoraModel(base_layers, config, adapter_name=adapter_name)
    _fill(model, adapter_name, tensors, Path(directory))
    return model


def add_saved_adapter(
    model: AdaLoraModel, directory: str | os.PathLike[str], adapter_name: str, *, inference_mode: bool = True
) -> None:
    """Add the adapter saved in `directory` to `model` under `adapter_name` (peft's PeftModel.load_adapter)."""
    config, tensors = read_adapter(directory)
    config.inference_mode = inference_mode
    model.add_adapter(adapter_name, config)
    _fill(model, adapter_name, tensors, Path(directory))


def _fill(model: AdaLoraModel, adapter_name: str, tensors: dict[str, np.ndarray], root: Path) -> None:
    """Resize the new adapter to its rank pattern (keeping ranknum) and copy the saved tensors in."""
    config = model.peft_config[adapter_name]
    if config.rank_pattern:
        try:
            model.resize_by_rank_pattern(adapter_name=adapter_name)
        except ValueError as err:
            raise ValueError(f"{root / CONFIG_NAME}: rank_pattern does not fit the model: {err}") from None
    weights_path = root / WEIGHTS_NAME
    triplets = model.triplets(adapter_name)
    base_keys = {saved_key(key, adapter_name): key for key in model.base_trainables(adapter_name)}
    expected = {f"{KEY_PREFIX}{n}.{p}" for n in triplets for p in PARTS} | set(base_keys)
    present = {key for key in tensors if key in expected or not _is_redundant_peft_copy(key)}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing:
        raise ValueError(f"{weights_path}: missing tensor(s) {missing}")
    if extra:
        raise ValueError(f"{weights_path}: tensor(s) {extra} belong to no adapted layer of this model")
    loaded = {}
    for name, triplet in triplets.items():
        weight = model.adapted[name].weight
        parts = []
        for part in PARTS:
            key = f"{KEY_PREFIX}{name}.{part}"
            want = tuple(getattr(triplet, part).shape)
            value = tensors[key]
            if value.shape != want:
                raise ValueError(
                    f"{weights_path}: {key} has shape {value.shape}, but the config (init_r = {config.init_r}, "
                    f"rank pattern {config.rank_pattern and config.rank_pattern.get(name + E_SUFFIX)}) needs {want}"
                )
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{weights_path}: {key} holds NaN or Inf")
            parts.append(from_numpy(namespace(weight), value, dtype=weight.dtype, device=device_of(weight)))
        loaded[name] = SVDTriplet(*parts)
    model.set_triplets(loaded, adapter_name)
    base = {}
    for key, name in base_keys.items():
        layer_name, attr = model.base_trainables(adapter_name)[name]
        current = getattr(model.layer(layer_name), attr)
        if tensors[key].shape != tuple(current.shape):
            raise ValueError(
                f"{weights_path}: {key} has shape {tensors[key].shape}, the model's is {tuple(current.shape)}"
            )
        base[name] = from_numpy(namespace(current), tensors[key], dtype=current.dtype, device=device_of(current))
    model.set_base_params(base, adapter_name)
