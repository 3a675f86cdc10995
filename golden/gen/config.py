"""config: which AdaLoraConfigs peft accepts, the adapter_config.json fields it writes for them, and
which it refuses (docs/SPEC.md 14.9)."""

from __future__ import annotations

from typing import Any

import peft

from adalora_ref.conformance.case import Case

from .common import Generated, case, exact, record

COMPARE_FIELDS = [
    "peft_type",
    "target_r",
    "init_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "rank_pattern",
    "fan_in_fan_out",
    "bias",
    "init_lora_weights",
]
CONFIG_ENTRIES = [
    {"total_step": 100},
    {
        "total_step": 1000,
        "init_r": 16,
        "target_r": 4,
        "tinit": 100,
        "tfinal": 200,
        "deltaT": 10,
        "lora_alpha": 32,
        "target_modules": ["v", "q"],
    },
    {"total_step": 10, "beta1": 0.5, "beta2": 0.9, "orth_reg_weight": 0.0, "lora_dropout": 0.1},
    {"total_step": 20, "target_modules": "model.*\\.(q|v)"},
    {"total_step": 20, "rank_pattern": {"q.lora_E": [True, False, True]}},
    {},
    {"total_step": 0},
    {"total_step": -5},
    {"total_step": 20, "tinit": 10, "tfinal": 10},
    {"total_step": 20, "tinit": 25},
    {"total_step": 20, "orth_reg_weight": -0.1},
    {"total_step": 20, "use_dora": True},
]


def cases() -> Generated:
    yield gen_config(700), {}


def saved_fields(
    kwargs: dict[str, Any], fields: list[str], refusals: tuple[type[Exception], ...] = (ValueError,)
) -> tuple[dict[str, Any] | None, str | None]:
    """The `fields` of the adapter_config.json peft writes for AdaLoraConfig(**kwargs) (a set-valued
    target_modules sorted), or None and peft's message when it refuses the config with `refusals`."""
    try:
        config = peft.AdaLoraConfig(**kwargs)
    except refusals as err:
        return None, str(err)
    saved = config.to_dict()
    fields_saved = {k: sorted(v) if isinstance(v, set) else v for k, v in saved.items() if k in fields}
    fields_saved["peft_type"] = str(saved["peft_type"].value)
    return fields_saved, None


def gen_config(seed: int) -> Case:
    entries = []
    for kwargs in CONFIG_ENTRIES:
        entry: dict[str, Any] = {"kwargs": kwargs, "compare_fields": COMPARE_FIELDS}
        saved, error = saved_fields(kwargs, COMPARE_FIELDS)
        if error is None:
            entry["adapter_config"] = saved
        else:
            entry["peft_error"] = error
        entries.append(entry)
    c = case(
        "config",
        "peft_accepts_and_refuses",
        "float64",
        "configs peft accepts (with what it saves) and refuses",
        {"entries": [{k: v for k, v in e.items() if k != "adapter_config"} for e in entries]},
        seed,
    )
    for i, entry in enumerate(entries):
        record(c, exact(f"entry{i}.valid", "accepted", step=None, layer=f"entry {i}"), "peft_error" not in entry)
        if "adapter_config" in entry:
            record(
                c,
                exact(f"entry{i}.adapter_config", "saved adapter_config fields", layer=f"entry {i}"),
                entry["adapter_config"],
            )
    return c
