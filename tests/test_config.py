"""AdaLoraConfig: defaults, validation, warnings, adapter_config.json in and out, target matching.

Sections, in order: defaults; validation (peft's rules, then the ones peft misses); warnings;
cases from peft's own test-suite (tests/test_config.py there); the seed port's Elixir config tests;
JSON and atomic writes; target matching; live comparisons with torch + peft (skipped without them).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adalora_ref.config import (
    PEFT_EXTRA_DEFAULTS,
    TASK_TYPES,
    AdaLoraConfig,
    is_target,
    matches_module_list_or_regex,
)

from .peft_live import require_peft

PEFT_TOTAL_STEP = "AdaLoRA does not work when `total_step` is None, supply a value > 0."
PEFT_SCHEDULE = "The supplied schedule values don't allow for a budgeting phase."
PEFT_R_IGNORED = "Note that `r` is not used in AdaLora and will be ignored."


def make(**kwargs: Any) -> AdaLoraConfig:
    """A config with total_step=100 unless the test gives its own."""
    return AdaLoraConfig(**{"total_step": 100, **kwargs})


def no_warnings(build: Any) -> Any:
    """Run `build()` and fail on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return build()


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults_are_peft_0_21_2s() -> None:
    config = no_warnings(lambda: AdaLoraConfig(total_step=1))
    assert (config.target_r, config.init_r, config.tinit, config.tfinal, config.deltaT) == (8, 12, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight) == (0.85, 0.85, 0.5)
    assert config.total_step == 1
    assert config.rank_pattern is None
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 8, 0.0)
    assert (config.fan_in_fan_out, config.bias, config.init_lora_weights) == (False, "none", True)
    assert config.target_modules is None and config.exclude_modules is None
    assert config.modules_to_save is None
    assert config.layers_to_transform is None and config.layers_pattern is None
    assert (config.inference_mode, config.use_dora) == (False, False)
    assert config.base_model_name_or_path is None and config.task_type is None
    assert config.extra == {}


def test_edge_values_peft_allows_are_accepted() -> None:
    assert make(init_r=8, target_r=8).init_r == 8  # k = 0 at every masking: allocator.py defines it
    zero = make(init_r=0, target_r=0)  # r == 0 is allowed for AdaLoRA (peft #1539)
    assert (zero.init_r, zero.target_r) == (0, 0)
    assert make(total_step=20, tinit=9, tfinal=10).tinit == 9  # one budgeting step
    assert make(orth_reg_weight=0).orth_reg_weight == 0
    assert make(lora_dropout=0.99).lora_dropout == 0.99


def test_numpy_numbers_become_plain_python_numbers() -> None:
    config = make(total_step=np.int64(10), init_r=np.int32(12), lora_alpha=np.float32(16.5), beta1=np.float64(0.5))
    assert type(config.total_step) is int and config.total_step == 10
    assert type(config.init_r) is int
    assert type(config.lora_alpha) is float and config.lora_alpha == 16.5
    assert type(config.beta1) is float
    json.dumps(config.to_dict())  # serializable


def test_lora_alpha_keeps_int_or_float() -> None:
    assert type(make(lora_alpha=32).lora_alpha) is int  # written back as 32, as peft writes it
    assert make(lora_alpha=0.5).lora_alpha == 0.5


def test_target_and_exclude_lists_are_sorted_sets() -> None:
    config = make(target_modules=("v", "q", "v"), exclude_modules={"b", "a"})
    assert config.target_modules == ["q", "v"]
    assert config.exclude_modules == ["a", "b"]
    assert make(target_modules=r".*\.q").target_modules == r".*\.q"  # a regex stays a string


def test_scaling_for_is_alpha_or_r() -> None:
    # peft (SVDLinear.update_layer): scaling = lora_alpha if lora_alpha > 0 else float(r)
    assert make(lora_alpha=32).scaling_for(12) == 32.0
    assert make(lora_alpha=0).scaling_for(12) == 12.0
    assert make(lora_alpha=-4).scaling_for(6) == 6.0
    with pytest.raises(ValueError, match=re.escape("AdaLoraConfig.scaling_for(r) must be an integer >= 0, got -1")):
        make().scaling_for(-1)
    with pytest.raises(ValueError, match=re.escape("got True")):
        make().scaling_for(True)


# ---- validation ----------------------------------------------------------------------------------

TASK_LIST = ", ".join(TASK_TYPES)
RANK_PATTERN_NEEDS = "AdaLoraConfig.rank_pattern must be None or a dict from module name to a list of bools"

# (id, keyword arguments on top of total_step=100, a substring of the message)
INVALID = [
    # rules peft 0.21.2 has (its message follows ours)
    (
        "total_step None",
        {"total_step": None},
        f"AdaLoraConfig.total_step must be an integer >= 1, got None. {PEFT_TOTAL_STEP}",
    ),
    (
        "total_step 0",
        {"total_step": 0},
        f"AdaLoraConfig.total_step must be an integer >= 1, got 0. {PEFT_TOTAL_STEP}",
    ),
    ("total_step -5", {"total_step": -5}, f"got -5. {PEFT_TOTAL_STEP}"),
    (
        "schedule",
        {"total_step": 20, "tinit": 10, "tfinal": 10},
        f"AdaLoraConfig.tinit must be < total_step - tfinal = 20 - 10 = 10, got 10. {PEFT_SCHEDULE}",
    ),
    (
        "orth_reg_weight < 0",
        {"orth_reg_weight": -0.1},
        "AdaLoraConfig.orth_reg_weight must be a finite number >= 0, got -0.1. "
        "`orth_reg_weight` should be greater than or equal to 0, but the value passed is -0.1",
    ),
    (
        "use_dora",
        {"use_dora": True},
        "AdaLoraConfig.use_dora must be False, got True. PeftType.ADALORA does not support DoRA.",
    ),
    (
        "loftq init",
        {"init_lora_weights": "loftq"},
        "AdaLoraConfig.init_lora_weights must be anything but 'loftq', got 'loftq'. "
        "PeftType.ADALORA does not support LOFTQ.",
    ),
    (
        "layers_to_transform with regex",
        {"target_modules": ".*q", "layers_to_transform": [0]},
        "AdaLoraConfig.layers_to_transform must be None when target_modules is a regex string, got [0]. "
        "`layers_to_transform` cannot be used when `target_modules` is a str.",
    ),
    (
        "layers_pattern with regex",
        {"target_modules": ".*q", "layers_pattern": "layer"},
        "AdaLoraConfig.layers_pattern must be None when target_modules is a regex string, got 'layer'. "
        "`layers_pattern` cannot be used when `target_modules` is a str.",
    ),
    (
        "layers_pattern alone",
        {"target_modules": ["q"], "layers_pattern": "layer"},
        "AdaLoraConfig.layers_pattern must be None (or empty) when layers_to_transform is None, got 'layer'. "
        "When `layers_pattern` is specified, `layers_to_transform` must also be specified.",
    ),
    (
        "task_type",
        {"task_type": "invalid-task-type"},
        "Invalid task type: 'invalid-task-type'. Must be one of the following task types: " + TASK_LIST + ".",
    ),
    # rules peft misses
    ("init_r < target_r", {"init_r": 4}, "AdaLoraConfig.init_r must be an integer >= target_r = 8, got 4"),
    ("target_r < 0", {"target_r": -1}, "AdaLoraConfig.target_r must be an integer >= 0, got -1"),
    (
        "init_r < 0",
        {"init_r": -1, "target_r": 0},
        "AdaLoraConfig.init_r must be an integer >= target_r = 0, got -1",
    ),
    ("beta1 0", {"beta1": 0.0}, "AdaLoraConfig.beta1 must be a number in the open interval (0, 1), got 0.0"),
    ("beta1 1", {"beta1": 1}, "AdaLoraConfig.beta1 must be a number in the open interval (0, 1), got 1"),
    (
        "beta2 1.5",
        {"beta2": 1.5},
        "AdaLoraConfig.beta2 must be a number in the open interval (0, 1), got 1.5",
    ),
    (
        "beta2 nan",
        {"beta2": math.nan},
        "AdaLoraConfig.beta2 must be a number in the open interval (0, 1), got nan",
    ),
    ("deltaT 0", {"deltaT": 0}, "AdaLoraConfig.deltaT must be an integer >= 1, got 0"),
    ("tinit < 0", {"tinit": -1}, "AdaLoraConfig.tinit must be an integer >= 0, got -1"),
    ("tfinal < 0", {"tfinal": -1}, "AdaLoraConfig.tfinal must be an integer >= 0, got -1"),
    (
        "orth_reg_weight nan",
        {"orth_reg_weight": math.nan},
        "AdaLoraConfig.orth_reg_weight must be a finite number >= 0, got nan",
    ),
    (
        "orth_reg_weight inf",
        {"orth_reg_weight": math.inf},
        "AdaLoraConfig.orth_reg_weight must be a finite number >= 0, got inf",
    ),
    (
        "lora_dropout 1",
        {"lora_dropout": 1.0},
        "AdaLoraConfig.lora_dropout must be a number with 0 <= lora_dropout < 1, got 1.0",
    ),
    (
        "lora_dropout < 0",
        {"lora_dropout": -0.1},
        "AdaLoraConfig.lora_dropout must be a number with 0 <= lora_dropout < 1, got -0.1",
    ),
    ("r < 0", {"r": -1}, "AdaLoraConfig.r must be an integer >= 0, got -1"),
    ("bias", {"bias": "some"}, "AdaLoraConfig.bias must be one of 'none', 'all', 'lora_only', got 'some'"),
    (
        "layers_to_transform < 0",
        {"target_modules": ["q"], "layers_to_transform": [-1]},
        "AdaLoraConfig.layers_to_transform must be an integer >= 0, got -1",
    ),
    (
        "rank_pattern ints",
        {"rank_pattern": {"q.lora_E": [1, 0]}},
        f"{RANK_PATTERN_NEEDS}, got {{'q.lora_E': [1, 0]}}",
    ),
    ("rank_pattern list", {"rank_pattern": [True]}, f"{RANK_PATTERN_NEEDS}, got [True]"),
    (
        "rank_pattern string",
        {"rank_pattern": {"q.lora_E": "TF"}},
        f"{RANK_PATTERN_NEEDS}, got {{'q.lora_E': 'TF'}}",
    ),
    (
        "extra clash",
        {"extra": {"init_r": 4}},
        "AdaLoraConfig.extra must be free of AdaLoraConfig's own field names and peft_type, got ['init_r']",
    ),
    ("extra peft_type", {"extra": {"peft_type": "LORA"}}, "got ['peft_type']"),
    ("extra not a dict", {"extra": [1]}, "AdaLoraConfig.extra must be a dict with string keys, got [1]"),
]
# integer-ness: a float equal to an integer, a bool and a string are all refused
INVALID += [
    (f"{name} {value!r}", {name: value}, f"AdaLoraConfig.{name} must be an integer >= {low}, got {value!r}")
    for name, low in [
        ("total_step", "1"),
        ("target_r", "0"),
        ("init_r", "target_r = 8"),
        ("tinit", "0"),
        ("tfinal", "0"),
        ("deltaT", "1"),
        ("r", "0"),
    ]
    for value in (12.0, True, "12")
]
# wrong types elsewhere
INVALID += [
    ("lora_alpha bool", {"lora_alpha": True}, "AdaLoraConfig.lora_alpha must be a finite number, got True"),
    ("lora_alpha str", {"lora_alpha": "8"}, "AdaLoraConfig.lora_alpha must be a finite number, got '8'"),
    ("lora_alpha nan", {"lora_alpha": math.nan}, "AdaLoraConfig.lora_alpha must be a finite number, got nan"),
    (
        "beta1 bool",
        {"beta1": True},
        "AdaLoraConfig.beta1 must be a number in the open interval (0, 1), got True",
    ),
    ("lora_dropout str", {"lora_dropout": "0.1"}, "got '0.1'"),
    ("fan_in_fan_out 1", {"fan_in_fan_out": 1}, "AdaLoraConfig.fan_in_fan_out must be True or False, got 1"),
    (
        "inference_mode None",
        {"inference_mode": None},
        "AdaLoraConfig.inference_mode must be True or False, got None",
    ),
    ("use_dora str", {"use_dora": "no"}, "AdaLoraConfig.use_dora must be True or False, got 'no'"),
    (
        "init_lora_weights 1",
        {"init_lora_weights": 1},
        "AdaLoraConfig.init_lora_weights must be True, False or a string, got 1",
    ),
    (
        "target_modules int",
        {"target_modules": 3},
        "AdaLoraConfig.target_modules must be a list of strings, a regex string or None, got 3",
    ),
    ("target_modules entry", {"target_modules": ["q", 3]}, "got ['q', 3]"),
    (
        "exclude_modules int",
        {"exclude_modules": 3},
        "AdaLoraConfig.exclude_modules must be a list of strings, a regex string or None, got 3",
    ),
    (
        "modules_to_save str",
        {"modules_to_save": "head"},
        "AdaLoraConfig.modules_to_save must be a list of strings or None, got 'head'",
    ),
    (
        "layers_pattern int",
        {"target_modules": ["q"], "layers_to_transform": 0, "layers_pattern": 3},
        "AdaLoraConfig.layers_pattern must be a string, a list of strings or None, got 3",
    ),
    (
        "layers_to_transform float",
        {"target_modules": ["q"], "layers_to_transform": 0.0},
        "AdaLoraConfig.layers_to_transform must be an integer >= 0, got 0.0",
    ),
    (
        "base_model_name_or_path",
        {"base_model_name_or_path": 3},
        "AdaLoraConfig.base_model_name_or_path must be a string or None, got 3",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_value_raises_naming_field_and_value(kwargs: dict[str, Any], message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. r != 8 warns before an invalid r is refused
        with pytest.raises(ValueError, match=re.escape(message)):
            make(**kwargs)


# ---- warnings ------------------------------------------------------------------------------------


def test_r_other_than_8_warns_that_it_is_ignored() -> None:
    with pytest.warns(UserWarning, match=r"AdaLoraConfig\.r=16 is ignored\. " + re.escape(PEFT_R_IGNORED)):
        config = make(r=16)
    assert config.r == 16  # kept and written back, never used


# (field, a value that would change the math if AdaLoRA honoured it)
IGNORED_LORA_OPTIONS = [
    ("use_rslora", True),
    ("alpha_pattern", {"encoder.q": 16}),
    ("layer_replication", [[0, 2], [1, 2]]),
    ("lora_bias", True),
    ("use_qalora", True),
    ("megatron_config", {"tensor_model_parallel_size": 2}),
    ("ensure_weight_tying", True),
    ("trainable_token_indices", [0, 1]),
    ("target_parameters", ["experts.weight"]),
    ("eva_config", {"rho": 2.0}),
]


@pytest.mark.parametrize(("key", "value"), IGNORED_LORA_OPTIONS, ids=[key for key, _ in IGNORED_LORA_OPTIONS])
def test_ignored_lora_option_warns_and_is_kept(key: str, value: Any) -> None:
    with pytest.warns(UserWarning, match=rf"AdaLoraConfig\.extra\['{key}'\].*ignored by AdaLoRA"):
        config = AdaLoraConfig.from_dict({"total_step": 10, key: value})
    assert config.extra == {key: value}
    assert config.to_dict()[key] == value


def test_ignored_option_at_its_default_is_silent_and_not_stored() -> None:
    config = no_warnings(lambda: AdaLoraConfig.from_dict({"total_step": 10, "use_rslora": False, "alpha_pattern": {}}))
    assert config.extra == {}


def test_bookkeeping_fields_are_kept_silently() -> None:
    data = {"total_step": 10, "peft_version": "0.17.0", "revision": "main", "auto_mapping": {"base": "X"}}
    config = no_warnings(lambda: AdaLoraConfig.from_dict(data))
    assert config.to_dict()["peft_version"] == "0.17.0"
    assert config.extra == {"peft_version": "0.17.0", "revision": "main", "auto_mapping": {"base": "X"}}


def test_loftq_config_without_loftq_init_is_dropped_as_peft_drops_it() -> None:
    # peft (LoraConfig.__post_init__): a loftq_config with init_lora_weights != 'loftq' is replaced by {}
    # with a warning, so AdaLoraConfig's own "does not support LOFTQ" check never sees it.
    with pytest.warns(UserWarning, match="`loftq_config` specified but will be ignored"):
        config = make(extra={"loftq_config": {"loftq_bits": 4}})
    assert "loftq_config" not in config.extra
    assert config.to_dict()["loftq_config"] == {}


def test_unknown_key_warns_and_round_trips() -> None:
    with pytest.warns(UserWarning, match=r"AdaLoraConfig\.extra\['from_the_future'\] is not a peft 0\.21\.2 field"):
        config = AdaLoraConfig.from_dict({"total_step": 10, "from_the_future": [1, 2]})
    assert config.to_dict()["from_the_future"] == [1, 2]


@pytest.mark.parametrize(("value", "acts_as"), [("gaussian", True), ("pissa", True), ("", False)])
def test_named_lora_init_warns_it_acts_as_a_bool(value: str, acts_as: bool) -> None:
    # AdaLoraLayer.update_layer: `if init_lora_weights: self.reset_lora_parameters(...)`, nothing else
    with pytest.warns(UserWarning, match=rf"init_lora_weights='{value}'.*acts as {acts_as}"):
        make(init_lora_weights=value)


def test_runtime_config_is_dropped_on_read_as_peft_does() -> None:
    with pytest.warns(UserWarning, match="runtime_config"):
        config = AdaLoraConfig.from_dict({"total_step": 10, "runtime_config": {"ephemeral_gpu_offload": True}})
    assert "runtime_config" not in config.to_dict()


# ---- cases from peft's own test-suite (peft tests/test_config.py) --------------------------------


def test_peft_suite_adalora_config_r_warning() -> None:
    kwargs = {
        "peft_type": "ADALORA",
        "task_type": "SEQ_2_SEQ_LM",
        "init_r": 12,
        "lora_alpha": 32,
        "total_step": 1,
    }
    # peft passes peft_type to the constructor; ours takes it only through from_dict
    no_warnings(lambda: AdaLoraConfig.from_dict(kwargs))
    with pytest.warns(UserWarning, match=re.escape(PEFT_R_IGNORED)):
        AdaLoraConfig(r=10, total_step=1)


PEFT_VALID_TIMINGS = [
    {"total_step": 100, "tinit": 0, "tfinal": 0},
    {"total_step": 100, "tinit": 10, "tfinal": 10},
    {"total_step": 100, "tinit": 79, "tfinal": 20},
    {"total_step": 100, "tinit": 80, "tfinal": 19},
]
PEFT_INVALID_TIMINGS = [
    {"total_step": 100, "tinit": 20, "tfinal": 80},
    {"total_step": 100, "tinit": 80, "tfinal": 20},
    {"total_step": 10, "tinit": 20, "tfinal": 0},
    {"total_step": 10, "tinit": 0, "tfinal": 10},
    {"total_step": 10, "tinit": 10, "tfinal": 0},
    {"total_step": 10, "tinit": 20, "tfinal": 20},
    {"total_step": 10, "tinit": 0, "tfinal": 20},
]


@pytest.mark.parametrize("timing", PEFT_VALID_TIMINGS)
def test_peft_suite_valid_timing_works(timing: dict[str, int]) -> None:
    AdaLoraConfig(**timing)


@pytest.mark.parametrize("timing", PEFT_INVALID_TIMINGS)
def test_peft_suite_timing_bounds_error(timing: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=re.escape(PEFT_SCHEDULE)):
        AdaLoraConfig(**timing)


def test_peft_suite_invalid_total_step_raises() -> None:
    with pytest.raises(ValueError, match=re.escape(PEFT_TOTAL_STEP)):
        AdaLoraConfig(total_step=None)
    with pytest.raises(ValueError, match=re.escape(PEFT_TOTAL_STEP)):
        AdaLoraConfig()


@pytest.mark.parametrize("task_type", [*TASK_TYPES, None])
def test_peft_suite_valid_task_type(task_type: str | None) -> None:
    assert AdaLoraConfig(total_step=1, task_type=task_type).task_type == task_type


def test_peft_suite_regex_with_layer_indexing() -> None:
    with pytest.raises(ValueError, match=re.escape("`layers_to_transform` cannot be used when `target_modules`")):
        make(target_modules=".*foo", layers_to_transform=[0])
    with pytest.raises(ValueError, match=re.escape("`layers_pattern` cannot be used when `target_modules` is")):
        make(target_modules=".*foo", layers_pattern=["bar"])
    make(target_modules=["foo"], layers_pattern=["bar"], layers_to_transform=[0])


def test_peft_suite_layers_pattern_needs_layers_to_transform() -> None:
    with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also"):
        make(target_modules=["query", "value"], layers_pattern="model.layers")
    both = make(target_modules=["query", "value"], layers_to_transform=[0, 1, 2], layers_pattern="model.layers")
    assert (both.layers_to_transform, both.layers_pattern) == ([0, 1, 2], "model.layers")


def test_peft_suite_save_pretrained_with_target_modules(tmp_path: Path) -> None:
    # peft turns the list into a set; ours keeps a sorted list. Both write a list and read it back equal.
    config = make(target_modules=["list", "a"])
    config.save_json(tmp_path / "adapter_config.json")
    loaded = AdaLoraConfig.load_json(tmp_path / "adapter_config.json")
    assert loaded == config and loaded.target_modules == ["a", "list"]


def test_peft_suite_forward_compatible_unknown_keys() -> None:
    # peft drops unknown keys with a warning; ours warns too but keeps them in `extra` (a deliberate
    # difference: writing the file back must not lose what a newer peft put there).
    data = {**make().to_dict(), "foobar": "baz", "spam": 123}
    with pytest.warns(UserWarning):
        config = AdaLoraConfig.from_dict(data)
    assert config.extra == {"foobar": "baz", "spam": 123}
    assert config.to_dict() == data


def test_peft_suite_refuses_json_without_peft_type(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"foo": "bar", "baz": 123}))
    with pytest.raises(ValueError, match="no `peft_type` key"):
        AdaLoraConfig.load_json(path)


def test_peft_suite_copy_deepcopy_pickle() -> None:
    config = make(target_modules=["q"], rank_pattern={"q.lora_E": [True, False]})
    for copied in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert copied.to_dict() == config.to_dict()


# ---- the seed port's config tests (shared/seed, Elixir) ------------------------------------------


def test_seed_creates_config_with_defaults() -> None:
    config = AdaLoraConfig(total_step=1000)
    # seed: `config.peft_type == :adalora`; here peft_type exists only in the JSON, as "ADALORA"
    assert config.to_dict()["peft_type"] == "ADALORA"
    assert (config.init_r, config.target_r, config.tinit, config.tfinal) == (12, 8, 0, 0)
    # seed calls the field `delta_t`; peft's attribute and JSON key is `deltaT`
    assert config.deltaT == 1 and config.to_dict()["deltaT"] == 1 and not hasattr(config, "delta_t")
    assert (config.beta1, config.beta2, config.orth_reg_weight) == (0.85, 0.85, 0.5)


def test_seed_total_step_is_required() -> None:
    # seed expects the message "total_step is required"; we keep peft's wording instead
    with pytest.raises(ValueError, match=r"AdaLoraConfig\.total_step must be an integer >= 1, got None"):
        AdaLoraConfig()


def test_seed_total_step_positive() -> None:
    with pytest.raises(ValueError, match=re.escape(PEFT_TOTAL_STEP)):
        AdaLoraConfig(total_step=0)


def test_seed_tinit_below_total_step_minus_tfinal() -> None:
    with pytest.raises(ValueError, match=re.escape(PEFT_SCHEDULE)):
        AdaLoraConfig(total_step=100, tinit=80, tfinal=30)


def test_seed_init_r_at_least_target_r() -> None:
    # peft 0.21.2 ACCEPTS init_r < target_r (its config has no such check; the allocator then asks
    # torch.kthvalue for a negative k and crashes). The seed refuses it, and so do we.
    with pytest.raises(ValueError, match=re.escape("AdaLoraConfig.init_r must be an integer >= target_r = 8, got 4")):
        AdaLoraConfig(total_step=100, init_r=4, target_r=8)


def test_seed_keeps_lora_alpha_and_dropout() -> None:
    config = AdaLoraConfig(total_step=100, lora_alpha=32, lora_dropout=0.1)
    assert (config.lora_alpha, config.lora_dropout) == (32, 0.1)


def test_seed_keeps_target_modules() -> None:
    # the seed keeps the list as given; ours sorts and dedupes (peft keeps a set). This list is sorted.
    assert AdaLoraConfig(total_step=100, target_modules=["q_proj", "v_proj"]).target_modules == [
        "q_proj",
        "v_proj",
    ]


# ---- adapter_config.json -------------------------------------------------------------------------


def rich_config() -> AdaLoraConfig:
    """A config with every field away from its default (and valid for peft too)."""
    return AdaLoraConfig(
        target_r=4, init_r=6, tinit=2, tfinal=3, deltaT=5, beta1=0.8, beta2=0.9, orth_reg_weight=0.3,
        total_step=50, rank_pattern={"encoder.layer.0.attn.q.lora_E": [True, False, True, True, False, True]},
        lora_alpha=32, lora_dropout=0.1, fan_in_fan_out=True, bias="lora_only",
        target_modules=["v", "q"], exclude_modules=["mlp"], modules_to_save=["head"],
        layers_to_transform=[0, 1], layers_pattern="layer", inference_mode=True,
        base_model_name_or_path="tiny/base", task_type="CAUSAL_LM",
    )  # fmt: skip


def test_to_dict_has_peft_keys_and_spelling() -> None:
    data = make(target_modules=["v", "q"]).to_dict()
    assert data["peft_type"] == "ADALORA"
    assert data["deltaT"] == 1 and "delta_t" not in data
    assert data["target_modules"] == ["q", "v"]
    expected_keys = {"peft_type", *PEFT_EXTRA_DEFAULTS} | {
        name for name in AdaLoraConfig.__dataclass_fields__ if name != "extra"
    }
    assert set(data) == expected_keys
    assert "extra" not in data and "runtime_config" not in data


def test_to_dict_is_a_copy() -> None:
    config = make(target_modules=["q"])
    config.to_dict()["target_modules"].append("v")
    assert config.target_modules == ["q"]


def test_from_dict_round_trip() -> None:
    config = rich_config()
    assert AdaLoraConfig.from_dict(config.to_dict()) == config


def test_from_dict_peft_type() -> None:
    assert AdaLoraConfig.from_dict({"total_step": 5}) == AdaLoraConfig(total_step=5)  # absent: fine
    assert AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 5}) == AdaLoraConfig(total_step=5)
    with pytest.raises(ValueError, match=re.escape("AdaLoraConfig.peft_type must be 'ADALORA', got 'LORA'")):
        AdaLoraConfig.from_dict({"peft_type": "LORA", "total_step": 5})
    with pytest.raises(ValueError, match=re.escape("AdaLoraConfig.from_dict(data) must be a dict, got [1]")):
        AdaLoraConfig.from_dict([1])  # type: ignore[arg-type]


def test_save_and_load_json(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    config = rich_config()
    config.save_json(path)
    assert path.read_text() == json.dumps(config.to_dict(), indent=2, sort_keys=True)  # peft's layout
    assert AdaLoraConfig.load_json(path) == config
    assert AdaLoraConfig.load_json(str(path)) == config
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_save_json_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    make(init_r=20).save_json(path)
    make(init_r=30).save_json(path)
    assert AdaLoraConfig.load_json(path).init_r == 30
    assert os.listdir(tmp_path) == ["adapter_config.json"]


@pytest.mark.parametrize("failing", ["os.open", "os.write", "os.fsync", "os.replace"])
def test_failed_save_leaves_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text("old content")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(failing, fail)
    with pytest.raises(OSError, match="disk full"):
        make().save_json(path)
    assert path.read_text() == "old content"
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_interrupted_save_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text("old content")

    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("os.replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        make().save_json(path)
    assert path.read_text() == "old content"
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_unserializable_extra_fails_before_touching_the_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text("old content")
    with pytest.warns(UserWarning, match="not a peft"):
        config = make(extra={"custom": object()})
    with pytest.raises(TypeError):
        config.save_json(path)
    assert path.read_text() == "old content"
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_save_json_into_missing_directory_creates_it(tmp_path: Path) -> None:
    """As save_adapter and every other writer of the project (adalora_ref._files.write_atomically)."""
    make(init_r=20).save_json(tmp_path / "missing" / "adapter_config.json")
    assert AdaLoraConfig.load_json(tmp_path / "missing" / "adapter_config.json").init_r == 20
    assert os.listdir(tmp_path / "missing") == ["adapter_config.json"]


def test_load_json_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        AdaLoraConfig.load_json(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"total_step": 10,,}', "invalid JSON at line 1 column 19"),
        ('{\n  "total_step": 10\n', "invalid JSON at line 3 column 1"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"total_step": 10}', "not a peft adapter config (no `peft_type` key)"),
        ('{"peft_type": "LORA", "total_step": 10}', "AdaLoraConfig.peft_type must be 'ADALORA', got 'LORA'"),
        (
            '{"peft_type": "ADALORA", "total_step": 10, "deltaT": 0}',
            "AdaLoraConfig.deltaT must be an integer >= 1, got 0",
        ),
        (
            '{"peft_type": "ADALORA", "total_step": 10, "init_r": 12.0}',
            "AdaLoraConfig.init_r must be an integer",
        ),
    ],
    ids=["syntax", "truncated", "not an object", "no peft_type", "other peft_type", "bad field", "float int"],
)
def test_load_json_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        AdaLoraConfig.load_json(path)


def test_load_json_not_utf8_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"total_step": "\xff"}')
    with pytest.raises(ValueError, match=re.escape(f"{path}: not UTF-8 text")):
        AdaLoraConfig.load_json(path)


# ---- target matching -----------------------------------------------------------------------------

# The Linear layers of the test model (the live test builds it in torch with these names).
LINEAR_NAMES = [
    "encoder.layer.0.attn.q",
    "encoder.layer.0.attn.v",
    "encoder.layer.0.mlp",
    "encoder.layer.1.attn.q",
    "encoder.layer.1.attn.v",
    "encoder.layer.1.mlp",
    "blocks.0.q",
    "blocks.1.q",
    "head",
    "q_proj",
    "model.q",
]
ALL_Q = {"encoder.layer.0.attn.q", "encoder.layer.1.attn.q", "blocks.0.q", "blocks.1.q", "model.q"}

# (id, config fields besides total_step, the Linear names peft wraps; empty: peft raises "no match")
MATCH_CASES = [
    ("list suffix", {"target_modules": ["q"]}, ALL_Q),
    ("dotted entry", {"target_modules": ["attn.q"]}, {"encoder.layer.0.attn.q", "encoder.layer.1.attn.q"}),
    ("exact top-level name", {"target_modules": ["head", "q_proj"]}, {"head", "q_proj"}),
    ("suffix needs a dot", {"target_modules": ["proj"]}, set()),
    (
        "list exclude",
        {"target_modules": ["q", "v"], "exclude_modules": ["encoder.layer.1.attn.v", "model.q"]},
        {
            "encoder.layer.0.attn.q",
            "encoder.layer.0.attn.v",
            "encoder.layer.1.attn.q",
            "blocks.0.q",
            "blocks.1.q",
        },
    ),
    (
        "regex fullmatch",
        {"target_modules": r"encoder\.layer\.\d+\.attn\.(q|v)"},
        {
            "encoder.layer.0.attn.q",
            "encoder.layer.0.attn.v",
            "encoder.layer.1.attn.q",
            "encoder.layer.1.attn.v",
        },
    ),
    ("regex is not a search", {"target_modules": "q"}, set()),
    (
        "regex exclude",
        {"target_modules": r".*q.*", "exclude_modules": r".*layer\.0\..*"},
        {"encoder.layer.1.attn.q", "blocks.0.q", "blocks.1.q", "q_proj", "model.q"},
    ),
    ("all excluded", {"target_modules": ["q"], "exclude_modules": ["q"]}, set()),
    ("empty exclude list", {"target_modules": ["head"], "exclude_modules": []}, {"head"}),
    # without layers_pattern peft reads the index after "<segment>.<segment>.": "blocks.1.q" has none
    (
        "layers_to_transform, no pattern",
        {"target_modules": ["q", "v"], "layers_to_transform": [1]},
        {"encoder.layer.1.attn.q", "encoder.layer.1.attn.v"},
    ),
    (
        "layer int + pattern",
        {"target_modules": ["q"], "layers_to_transform": 0, "layers_pattern": "blocks"},
        {"blocks.0.q"},
    ),
    (
        "pattern list",
        {"target_modules": ["q"], "layers_to_transform": [1], "layers_pattern": ["blocks", "layer"]},
        {"blocks.1.q", "encoder.layer.1.attn.q"},
    ),
    # peft quirk: a name equal to a list entry is targeted before layers_to_transform is looked at
    (
        "exact entry skips the layer filter",
        {"target_modules": ["q", "encoder.layer.1.attn.v"], "layers_to_transform": [0]},
        {"encoder.layer.0.attn.q", "encoder.layer.1.attn.v"},
    ),
    (
        "empty layers_to_transform",
        {"target_modules": ["mlp"], "layers_to_transform": []},
        {"encoder.layer.0.mlp", "encoder.layer.1.mlp"},
    ),
    ("modules_to_save never targeted", {"target_modules": ["q", "head"], "modules_to_save": ["head"]}, ALL_Q),
    (
        "modules_to_save covers children",
        {"target_modules": ["q"], "modules_to_save": ["model"]},
        ALL_Q - {"model.q"},
    ),
    ("nothing matches", {"target_modules": ["nope"]}, set()),
]
MATCH_IDS = [case[0] for case in MATCH_CASES]


def our_selection(fields: dict[str, Any]) -> set[str]:
    config = AdaLoraConfig(total_step=10, **fields)
    return {name for name in LINEAR_NAMES if is_target(config, name)}


@pytest.mark.parametrize(("fields", "expected"), [case[1:] for case in MATCH_CASES], ids=MATCH_IDS)
def test_is_target_selection(fields: dict[str, Any], expected: set[str]) -> None:
    assert our_selection(fields) == expected


def test_matches_module_list_or_regex() -> None:
    assert matches_module_list_or_regex(["q"], "q")
    assert matches_module_list_or_regex(["q"], "a.b.q")
    assert not matches_module_list_or_regex(["q"], "a.xq")
    assert not matches_module_list_or_regex(["q"], "q.sub")
    assert not matches_module_list_or_regex([], "q")
    assert matches_module_list_or_regex(r"a\..*", "a.b.q")
    assert not matches_module_list_or_regex("q", "a.q")  # fullmatch, not search
    assert not matches_module_list_or_regex("a", "ab")


def test_is_target_needs_target_modules() -> None:
    with pytest.raises(ValueError, match=r"AdaLoraConfig\.target_modules must be given .* got None"):
        is_target(make(), "q")
    with pytest.raises(ValueError, match="'all-linear' needs the module types"):
        is_target(make(target_modules="ALL-LINEAR"), "q")


def test_is_target_root_and_precedence() -> None:
    assert not is_target(make(target_modules=".*"), "")  # the root module is never targeted
    assert not is_target(make(target_modules=["q"], exclude_modules=["q"]), "q")  # excluded wins over exact
    assert not is_target(make(target_modules=["q"], modules_to_save=["q"]), "q")


def test_modules_to_save_matches_whole_segments() -> None:
    config = make(target_modules=["head", "header", "sub"], modules_to_save=["head"])
    assert not is_target(config, "head")
    assert not is_target(config, "x.head")
    assert not is_target(config, "head.sub")
    assert is_target(config, "header")
    assert is_target(config, "x.header")


def test_layer_index_is_the_first_one() -> None:
    # peft matches lazily, so the index of "layers" wins over a nested expert index
    config = make(target_modules=["q"], layers_to_transform=[1], layers_pattern="layers")
    assert is_target(config, "model.layers.1.experts.0.q")
    assert not is_target(config, "model.layers.0.experts.1.q")
    unpatterned = make(target_modules=["q"], layers_to_transform=[1])
    assert is_target(unpatterned, "model.layers.1.experts.0.q")
    assert not is_target(unpatterned, "layers.1.q")  # no segment before "layers": no index found


# ---- live against torch + peft -------------------------------------------------------------------


def peft_accepts(build: Any) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            build()
        except ValueError:
            return False
    return True


# Configs on which peft's own rules decide (accepted or refused); ours must agree on each.
PARITY_CASES = [
    {"total_step": 1},
    {},
    {"total_step": None},
    {"total_step": 0},
    {"total_step": -3},
    *PEFT_VALID_TIMINGS,
    *PEFT_INVALID_TIMINGS,
    {"total_step": 20, "tinit": 9, "tfinal": 10},
    {"total_step": 10, "orth_reg_weight": -0.5},
    {"total_step": 10, "orth_reg_weight": 0.0},
    {"total_step": 10, "use_dora": True},
    {"total_step": 10, "init_lora_weights": "loftq"},
    {"total_step": 10, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
    {"total_step": 10, "loftq_config": {"loftq_bits": 4}},
    {"total_step": 10, "target_modules": ".*q", "layers_to_transform": [0]},
    {"total_step": 10, "target_modules": ".*q", "layers_pattern": "layer"},
    {"total_step": 10, "target_modules": ".*q", "layers_pattern": ""},
    {"total_step": 10, "target_modules": ["q"], "layers_pattern": "layer"},
    {"total_step": 10, "target_modules": ["q"], "layers_pattern": []},
    {"total_step": 10, "target_modules": ["q"], "layers_pattern": "layer", "layers_to_transform": [0]},
    {"total_step": 10, "r": 16},
    {"total_step": 10, "task_type": "invalid-task-type"},
    *({"total_step": 10, "task_type": task} for task in TASK_TYPES),
]


@pytest.mark.peft
@pytest.mark.parametrize("fields", PARITY_CASES, ids=[str(case) for case in PARITY_CASES])
def test_live_accepts_and_refuses_where_peft_does(fields: dict[str, Any]) -> None:
    _, peft = require_peft()
    ours = dict(fields)
    if "loftq_config" in ours:  # a LoRA-only field: ours keeps it in `extra`
        ours["extra"] = {"loftq_config": ours.pop("loftq_config")}
    assert peft_accepts(lambda: AdaLoraConfig(**ours)) == peft_accepts(lambda: peft.AdaLoraConfig(**fields))


# Configs peft 0.21.2's AdaLoraConfig accepts and ours refuses (rules peft misses).
STRICTER_THAN_PEFT = [
    {"init_r": 4},
    {"target_r": -1},
    {"beta1": 0.0},
    {"beta2": 1.0},
    {"deltaT": 0},
    {"tinit": -1},
    {"tfinal": -1},
    {"total_step": 10.0},
    {"init_r": 12.0},
    {"lora_dropout": 1.5},
    {"bias": "some"},
    {"orth_reg_weight": math.nan},
    {"target_modules": ["q"], "layers_to_transform": [-1]},
]


@pytest.mark.peft
@pytest.mark.parametrize("fields", STRICTER_THAN_PEFT, ids=[str(case) for case in STRICTER_THAN_PEFT])
def test_live_peft_accepts_what_we_refuse(fields: dict[str, Any]) -> None:
    _, peft = require_peft()
    assert peft_accepts(lambda: peft.AdaLoraConfig(**{"total_step": 100, **fields}))
    assert not peft_accepts(lambda: make(**fields))


def peft_file_dict(peft_config: Any) -> dict[str, Any]:
    """peft's to_dict as it lands in the file: sets become (here: sorted) lists, enums their value."""
    out = {}
    for key, value in peft_config.to_dict().items():
        out[key] = sorted(value) if isinstance(value, set) else value
    return json.loads(json.dumps(out))


@pytest.mark.peft
def test_live_default_file_is_byte_identical_to_peft(tmp_path: Path) -> None:
    _, peft = require_peft()
    peft.AdaLoraConfig(total_step=10, target_modules=r".*\.q").save_pretrained(tmp_path / "peft")
    make(total_step=10, target_modules=r".*\.q").save_json(tmp_path / "ours.json")
    assert (tmp_path / "ours.json").read_bytes() == (tmp_path / "peft" / "adapter_config.json").read_bytes()


@pytest.mark.peft
def test_live_ours_to_peft_round_trip(tmp_path: Path) -> None:
    _, peft = require_peft()
    config = rich_config()
    config.save_json(tmp_path / "adapter_config.json")
    loaded = peft.AdaLoraConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded.target_modules, set)
    assert peft_file_dict(loaded) == config.to_dict()


@pytest.mark.peft
def test_live_peft_to_ours_round_trip(tmp_path: Path) -> None:
    _, peft = require_peft()
    fields = {**rich_config().to_dict(), "use_rslora": True, "alpha_pattern": {"q": 16}, "lora_bias": True}
    del fields["peft_type"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config = peft.AdaLoraConfig(**fields)
    peft_config.save_pretrained(str(tmp_path / "peft"))
    with pytest.warns(UserWarning, match="ignored by AdaLoRA"):
        ours = AdaLoraConfig.load_json(tmp_path / "peft" / "adapter_config.json")
    assert ours.extra == {"use_rslora": True, "alpha_pattern": {"q": 16}, "lora_bias": True}
    assert ours.to_dict() == peft_file_dict(peft_config)
    (tmp_path / "ours").mkdir()
    ours.save_json(tmp_path / "ours" / "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.AdaLoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert peft_file_dict(reloaded) == peft_file_dict(peft_config)


def torch_model(torch: Any) -> Any:
    """A torch module holding a Linear(3, 3) at each of LINEAR_NAMES, with plain modules between."""
    root = torch.nn.Module()
    for name in LINEAR_NAMES:
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(3, 3))
    return root


@pytest.mark.peft
@pytest.mark.parametrize(("fields", "expected"), [case[1:] for case in MATCH_CASES], ids=MATCH_IDS)
def test_live_matching_agrees_with_get_peft_model(fields: dict[str, Any], expected: set[str]) -> None:
    torch, peft = require_peft()
    model = torch_model(torch)
    linear_names = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert linear_names == set(LINEAR_NAMES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wrapped = peft.get_peft_model(model, peft.AdaLoraConfig(total_step=10, **copy.deepcopy(fields)))
        except ValueError as err:
            assert "not found" in str(err) or "excluded" in str(err) or "No modules" in str(err)
            peft_selection: set[str] = set()
        else:
            inner = wrapped.base_model.model
            peft_selection = {name for name, module in inner.named_modules() if hasattr(module, "lora_A")}
    assert peft_selection == expected
    assert our_selection(fields) == peft_selection
