"""Which modules an AdaLoRA adapter goes on: peft 0.21.2's `check_target_module_exists`, branch for branch.

Owns `is_target` (target_modules, exclude_modules, modules_to_save, layers_to_transform,
layers_pattern, in peft's order), `is_module_to_save` (peft's `_set_trainable` suffix test),
`matches_module_list_or_regex`, and the regexes peft builds from config entries (config.py compiles
them when a config is made, so that a bad pattern is refused there rather than here; `layers_patterns`
lists the layers_pattern entries for both).

Does not own the config's fields or their validation (config.py) nor the model's layers (model.py).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import AdaLoraConfig


def matches_module_list_or_regex(pattern: list[str] | str, name: str) -> bool:
    """peft's name test: a string is a regex the whole name must match; a list matches a name equal
    to an entry or ending with "." + entry (so "q" matches "attn.q" but not "attn.xq")."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def is_target(config: AdaLoraConfig, name: str) -> bool:
    """Whether peft 0.21.2 would put an AdaLoRA layer on the module with this dotted name.

    In peft's order: exclude_modules wins; then a module named by modules_to_save is never targeted;
    then target_modules. With a list, a name equal to an entry is targeted whatever
    layers_to_transform says (peft's quirk); a name matching only by suffix must also sit in one of
    layers_to_transform when that is set. The empty name (the root module) is never targeted.
    """
    targets = config.target_modules
    if targets is None:
        raise ValueError(
            "AdaLoraConfig.target_modules must be given to match modules, got None "
            "(peft falls back to a per-architecture table this reference does not have)"
        )
    if isinstance(targets, str) and targets.lower() == "all-linear":
        raise ValueError("AdaLoraConfig.target_modules='all-linear' needs the module types; list the names instead")
    if not name:
        return False
    if config.exclude_modules and matches_module_list_or_regex(config.exclude_modules, name):
        return False
    if config.modules_to_save and _is_module_to_save(config.modules_to_save, name):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + entry) for entry in targets):
        return False
    return _in_transformed_layer(config, name)


def is_module_to_save(config: AdaLoraConfig, name: str) -> bool:
    """Whether peft wraps the module with this name in a ModulesToSaveWrapper (a trainable copy).

    peft's `_set_trainable` test is a plain string suffix: `name.endswith(entry)` for an entry of
    modules_to_save (so "head" also matches "lm_head"). This differs from the regex with which the
    same entries exclude a module from adapter targeting (see is_target).
    """
    return bool(name) and any(name.endswith(entry) for entry in config.modules_to_save or [])


def _is_module_to_save(modules_to_save: list[str], name: str) -> bool:
    """peft's test: the name, or one of its dotted prefixes / suffixes, is an entry (read as a regex)."""
    return any(re.match(module_to_save_regex(entry), name) for entry in modules_to_save)


def module_to_save_regex(entry: str) -> str:
    """The regex peft builds from a modules_to_save entry to keep that module out of the targets."""
    return rf"(^|.*\.){entry}($|\..*)"


def layer_index_regex(layers_pattern: str) -> str:
    """The regex peft builds from a layers_pattern entry to find a layer index in a module's name."""
    return rf"(?:^|.*?\.){layers_pattern}\.(?P<idx>\d+)\."


def layers_patterns(layers_pattern: list[str] | str | None) -> list[str]:
    """The config's layers_pattern as a list: [] for None, [pattern] for a single string."""
    if layers_pattern is None:
        return []
    return [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)


def _in_transformed_layer(config: AdaLoraConfig, name: str) -> bool:
    """Whether the layer index in `name` is one of layers_to_transform (True when that is unset or [])."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = _layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == wanted if isinstance(wanted, int) else index in wanted


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The first number in `name` that follows a layers_pattern segment, as peft finds it.

    Without a pattern peft takes the first `<segment>.<digits>.` that has a dot before it: the
    "0" of "model.layers.0.q", but nothing in "layers.0.q" (no segment before "layers").
    A pattern is inserted into peft's regex as is (a regex, not a literal).
    """
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in layers_patterns(layers_pattern):
            match = re.match(layer_index_regex(pattern), name)
            if match is not None:
                break
    return int(match["idx"]) if match is not None else None
