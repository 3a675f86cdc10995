"""targeting: which modules peft's get_peft_model adapts, given the names of a model's Linear layers
and an AdaLoraConfig's matching fields (target_modules as a list or a regex, exclude_modules,
layers_to_transform, layers_pattern, modules_to_save) (docs/SPEC.md 8.5, 14.10).

The model is a tree of plain torch.nn.Module containers with a Linear(3, 3) at each listed name; the
entries never match a container (peft would refuse to adapt one). When peft finds nothing to adapt
it raises; the case records that as an empty set, with peft's message for information."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import peft
import torch

from adalora_ref.conformance.case import Case

from .common import Generated, case, exact, record

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.fc",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.1.mlp.fc",
    "model.layers.2.self_attn.q_proj",
    "model.layers.2.self_attn.v_proj",
    "model.layers.2.mlp.fc",
    "blocks.0.q",
    "blocks.1.q",
    "encoder.layer.0.attn.q",
    "encoder.layer.1.attn.q",
    "q",
    "q_proj",
    "head",
]
ENTRIES: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "v_proj"]},  # a name equal to an entry or ending in "." + entry
    {"target_modules": ["self_attn.q_proj"]},  # a dotted entry matches whole segments
    {"target_modules": ["head", "q"]},
    {"target_modules": ["proj"]},  # "q_proj" does not end in ".proj": nothing matches
    {"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"},  # a string is a regex on the whole name
    {"target_modules": r"q_proj"},  # fullmatch, not search: only the top-level q_proj
    {"target_modules": r".*\.q"},
    {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.v_proj", "q_proj"]},
    {"target_modules": r".*_proj", "exclude_modules": r".*layers\.0\..*"},
    {"target_modules": ["q", "q_proj"], "exclude_modules": []},
    {"target_modules": ["q_proj", "fc"], "layers_to_transform": [1]},  # no pattern: the first <seg>.<n>. after a dot
    {"target_modules": ["q_proj", "fc"], "layers_to_transform": 2, "layers_pattern": "layers"},
    {"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": ["blocks", "layer"]},
    {"target_modules": ["q"], "layers_to_transform": [1]},  # "blocks.1.q" has no index without a pattern
    {"target_modules": ["fc", "model.layers.2.self_attn.v_proj"], "layers_to_transform": [0]},  # exact: no filter
    {"target_modules": ["fc"], "layers_to_transform": []},  # empty: no filter
    {"target_modules": ["q", "head"], "modules_to_save": ["head"]},  # modules_to_save is never adapted
    {"target_modules": ["q"], "modules_to_save": ["blocks"]},  # ... nor anything inside it
]


def cases() -> Generated:
    yield gen_targeting(900), {}


def module_tree(names: list[str]) -> torch.nn.Module:
    """Plain containers with a torch.nn.Linear(3, 3) at each dotted name."""
    root = torch.nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(3, 3))
    return root


def peft_targets(kwargs: dict[str, Any], modules: list[str] = MODULES) -> tuple[list[str], str | None]:
    """The Linear names (of `modules`) peft adapts under `kwargs` (sorted), and its error when it adapts none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.get_peft_model(module_tree(modules), peft.AdaLoraConfig(**copy.deepcopy(kwargs)))
        except ValueError as err:
            if "not found" not in str(err) and "No modules" not in str(err):
                raise
            return [], str(err)
    inner = model.base_model.model
    return sorted(name for name, module in inner.named_modules() if hasattr(module, "lora_E")), None


def gen_targeting(seed: int) -> Case:
    entries = []
    for fields in ENTRIES:
        entry: dict[str, Any] = {"kwargs": {"total_step": 10, **fields}}
        targeted, error = peft_targets(entry["kwargs"])
        if error is not None:
            entry["peft_error"] = error
        entries.append((entry, targeted))
    config = {"modules": MODULES, "entries": [entry for entry, _ in entries]}
    description = "the modules peft adapts for each config: lists, regexes, excludes, layer filters"
    c = case("targeting", "peft_targets", "float64", description, config, seed)
    for i, (_, targeted) in enumerate(entries):
        record(c, exact(f"entry{i}.targeted", "targeted modules", layer=f"entry {i}"), targeted)
    return c
