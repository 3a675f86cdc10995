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

Saving never touches anything in the directory but the two checkpoint files, and is safe at every
crash point. Both files are first written and flushed in a staging folder of the save's own inside
the directory (`.adalora-save-<random>`); then the weights, and after them the config, take their
place by rename. The weights carry the SHA-256 of the config they were saved with (safetensors
metadata `adalora_ref.config_sha256`; peft ignores it), so a crash between the two renames is
recognised when loading, and the config still waiting in the staging folder is read: a load sees
the old checkpoint or the new one, never a mix. The next save removes leftover staging folders.
(peft's own loader knows nothing of this; after such a crash, save again before loading with peft.)
New folders and files get the permissions of the user's umask.

Tensor dtypes: any floating type (float16, bfloat16, float32, float64) is read and cast to the
model's dtype when copied in, as peft's load_state_dict does; integer or boolean tensors are
refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes
from safetensors.numpy import save as save_safetensors_bytes

from ._backend import device_of, from_numpy, namespace, to_numpy
from ._files import fsync_dir, write_new_file
from .config import AdaLoraConfig
from .layer import SVDTriplet
from .model import E_SUFFIX, AdaLoraModel, BaseLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PARTS = ("lora_A", "lora_E", "lora_B")
STAGING_PREFIX = ".adalora-save-"  # a save's own folder inside the checkpoint directory
CONFIG_HASH_KEY = "adalora_ref.config_sha256"  # safetensors metadata: the config saved with these weights
FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors dtypes an adapter tensor may have


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
    """Write one adapter of `model` (default: the trainable one) in peft's format to `directory`.

    (peft's save_pretrained puts the adapter "default" in the directory itself and any other adapter
    in a subdirectory named after it: pass that path.) Only the two checkpoint files are replaced;
    everything else in `directory` (a README, other adapters' subdirectories) is left as it is. At
    every point of the save, a crash leaves a checkpoint that `load_adapter` reads whole: the old
    one or the new one (module docstring, "Saving").
    """
    target = Path(directory)
    name = adapter_name or model.trainable_adapter_name or next(iter(model.peft_config))
    if name not in model.peft_config:
        raise ValueError(f"no adapter named {name!r}; adapters are {list(model.peft_config)}")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; refusing to replace it")
    config_dict = model.peft_config[name].to_dict()
    config_dict["inference_mode"] = True
    config_bytes = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
    metadata = {"format": "pt", CONFIG_HASH_KEY: hashlib.sha256(config_bytes).hexdigest()}
    weights_bytes = save_safetensors_bytes(adapter_state_dict(model, name), metadata=metadata)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    os.mkdir(staging)
    try:
        write_new_file(staging / WEIGHTS_NAME, weights_bytes)
        write_new_file(staging / CONFIG_NAME, config_bytes)
        fsync_dir(staging)
    except BaseException:
        _remove_staging(staging)  # nothing in the checkpoint changed yet
        raise
    # The commit: weights first, then the config. Between the two renames the new config waits in
    # `staging`, where load_adapter finds it by the hash the new weights carry.
    os.replace(staging / WEIGHTS_NAME, target / WEIGHTS_NAME)
    fsync_dir(target)
    os.replace(staging / CONFIG_NAME, target / CONFIG_NAME)
    fsync_dir(target)
    for leftover in sorted(target.glob(f"{STAGING_PREFIX}*")):  # ours, and those of interrupted saves
        _remove_staging(leftover)
    return target


def _remove_staging(staging: Path) -> None:
    """Remove a staging folder of ours: its two checkpoint files, then the folder. Anything else
    found in it (not ours) is left, and so is the folder."""
    with contextlib.suppress(OSError):  # a leftover is harmless: the next save tries again
        for file_name in (WEIGHTS_NAME, CONFIG_NAME):
            (staging / file_name).unlink(missing_ok=True)
        os.rmdir(staging)


def read_adapter_tensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of an adapter_model.safetensors file; errors name the file."""
    return _read_weights(path)[0]


def _read_weights(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of an adapter_model.safetensors file; errors name the file.

    Floating tensors of any width (F16, BF16, F32, F64) are read as they are stored; the model's
    dtype is applied when they are copied in, as peft's load_state_dict does. Other dtypes (integers,
    booleans) are refused: peft never saves an adapter so, and casting them would hide a damaged file.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (an adapter checkpoint needs {WEIGHTS_NAME})") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a safetensors file") from None
    header = _safetensors_header(path, data)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: not a readable safetensors file: __metadata__ is not an object")
    for key, spec in header.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: not a readable safetensors file: the header entry of {key} is not an object")
        if spec.get("dtype") not in FLOATS:
            raise ValueError(
                f"{path}: tensor {key} has dtype {spec.get('dtype')}; adapter tensors must be floating point "
                f"({', '.join(FLOATS)})"
            )
    bf16 = sorted(k for k, v in header.items() if v["dtype"] == "BF16")
    if bf16:  # NumPy has no bfloat16: read them as their 16-bit patterns, widened below
        for key in bf16:
            header[key] = {**header[key], "dtype": "U16"}
        text = json.dumps({**header, "__metadata__": metadata} if metadata else header).encode()
        data = len(text).to_bytes(8, "little") + text + data[8 + int.from_bytes(data[:8], "little") :]
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError, KeyError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
    for key in bf16:  # a bfloat16 is the upper half of a float32
        tensors[key] = (tensors[key].astype(np.uint32) << 16).view(np.float32)
    return tensors, metadata


def _safetensors_header(path: Path, data: bytes) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < size <= len(data) - 8:
            raise ValueError(f"header length {size} does not fit a file of {len(data)} bytes")
        header = json.loads(data[8 : 8 + size])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
    return header


def read_adapter(directory: str | os.PathLike[str]) -> tuple[AdaLoraConfig, dict[str, np.ndarray]]:
    """The config and tensors of a saved adapter; errors name the file.

    When the weights were saved by `save_adapter` and the config beside them is not the one they
    were saved with, a save was interrupted between its two renames: its config is still in a
    staging folder, and that one is read (the new checkpoint, whole). Otherwise the config beside
    the weights is read as it is (peft's files carry no hash, and a hand-edited config is the user's).
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (an adapter checkpoint is a directory)")
    tensors, metadata = _read_weights(root / WEIGHTS_NAME)
    return AdaLoraConfig.load_json(_config_of(root, metadata.get(CONFIG_HASH_KEY))), tensors


def _config_of(root: Path, config_hash: str | None) -> Path:
    """The adapter_config.json that belongs to weights saved with `config_hash`."""
    beside = root / CONFIG_NAME
    if config_hash is None or _sha256(beside) == config_hash:
        return beside
    for staged in sorted(root.glob(f"{STAGING_PREFIX}*/{CONFIG_NAME}")):
        if _sha256(staged) == config_hash:
            return staged
    return beside


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


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
        if not np.all(np.isfinite(tensors[key])):
            raise ValueError(f"{weights_path}: {key} holds NaN or Inf")
        base[name] = from_numpy(namespace(current), tensors[key], dtype=current.dtype, device=device_of(current))
    model.set_base_params(base, adapter_name)
