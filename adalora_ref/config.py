"""AdaLoRA's configuration, as peft 0.21.2's `AdaLoraConfig` holds, checks and saves it.

Owns:
- `AdaLoraConfig`: every field AdaLoRA reads, with peft's names and defaults, plus `extra` for the
  LoRA fields AdaLoRA does not read (kept so that a peft adapter_config.json is written back whole);
- validation: peft's rules, with peft's message text kept inside ours, plus the rules peft misses
  (init_r >= target_r, betas in (0, 1), integer fields really integers, numbers finite, regular
  expressions that compile, values nested at most MAX_NESTING levels deep, ...);
- adapter_config.json in and out (`to_dict`, `from_dict`, `save_json` written atomically, `load_json`).

Target module matching (`is_target`, `is_module_to_save`, `matches_module_list_or_regex`) lives in
targets.py; config.py re-exports those names.

Does not own: the layers (layer.py), the rank allocator and its schedule (allocator.py), the model
and which of its layers exist (model.py), tensors and safetensors files (checkpoint.py). No torch here.

Errors: every invalid value, of a wrong type or out of range, raises `ValueError` whose message starts
`AdaLoraConfig.<field> must be ..., got <value>`. Where peft has a message for the same rule, peft's
text follows ours, so a test can match either.

Warnings (`UserWarning`): `r` set to anything but 8 (peft warns too: AdaLoRA uses `init_r`); a LoRA
option that AdaLoRA's SVD layers do not read set away from its default (`use_rslora`, `alpha_pattern`,
`lora_bias`, `layer_replication`, `use_qalora`, ...): kept in `extra`, written back, never honoured.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from ._backend import INT64_MAX, INT64_REQUIREMENT, is_finite_real, is_integer, is_real, plain_real, shown
from ._files import write_atomically
from .targets import is_module_to_save as is_module_to_save  # re-exported: target matching lived here
from .targets import is_target as is_target
from .targets import layer_index_regex, layers_patterns, module_to_save_regex
from .targets import matches_module_list_or_regex as matches_module_list_or_regex

PEFT_TYPE = "ADALORA"
PEFT_VERSION = "0.21.2"  # the peft release whose adapter_config.json this module reads and writes
BIAS_CHOICES = ("none", "all", "lora_only")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# The fields peft 0.21.2 writes to an AdaLoRA adapter_config.json that AdaLoraConfig has no attribute
# for, with the value peft writes when they are left unset. They live in `AdaLoraConfig.extra`.
PEFT_EXTRA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "peft_version": PEFT_VERSION,
    "qalora_group_size": 16,
    "revision": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "use_rslora": False,
    "velora_config": None,
}
# Extra fields that describe the file, not the computation: other values are kept without a warning.
_BOOKKEEPING_FIELDS = frozenset({"auto_mapping", "megatron_core", "peft_version", "qalora_group_size", "revision"})
MAX_NESTING = 100
"""The deepest a value in a config may nest lists and dicts (peft's own fields nest 3 levels at most).
Deeper values would overflow Python's stack when copied, compared or written back."""

_PEFT_TOTAL_STEP = "AdaLoRA does not work when `total_step` is None, supply a value > 0."
_PEFT_SCHEDULE = (
    "The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
    "increase `total_step`."
)
_PEFT_LOFTQ_IGNORED = "`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'."


@dataclass
class AdaLoraConfig:
    """The AdaLoRA hyperparameters and the LoRA fields AdaLoRA reads, named as peft names them.

    Schedule (in optimizer steps): no pruning while step <= tinit; then the total rank budget
    shrinks (cubically) from init_r to target_r per layer until total_step - tfinal, masking every
    deltaT steps; then the ranks stay fixed. beta1 / beta2 smooth the importance and its
    uncertainty. Each adapted layer starts with rank init_r; `r` is LoRA's rank and AdaLoRA ignores it.

    List-valued `target_modules` / `exclude_modules` are kept sorted and without duplicates: peft
    keeps them as sets, so order carries no meaning.

    `extra` holds the other fields of a peft adapter_config.json (`use_rslora`, `peft_version`, ...,
    and keys peft 0.21.2 does not know) whose value differs from peft's default; `to_dict` writes
    them back, and fills in peft's default for the rest.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # peft's spelling, also the JSON key
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_lora_weights: bool | str = True
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    inference_mode: bool = False
    use_dora: bool = False
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):  # in definition order, extra included
            value = getattr(self, f.name)
            if _nests_deeper_than(value, MAX_NESTING):
                _fail(f.name, f"nested at most {MAX_NESTING} levels deep (lists and dicts)", value)
        self._check_schedule()
        self._check_lora_fields()
        self._check_matching_fields()
        self._check_rank_pattern()
        self._check_extra()

    # ---- validation -------------------------------------------------------------------------

    def _check_schedule(self) -> None:
        """Ranks, steps and the EMA factors: peft's rules and the ones it leaves to a crash later."""
        if self.total_step is None:
            _fail("total_step", "an integer >= 1", None, _PEFT_TOTAL_STEP)
        if is_real(self.total_step) and self.total_step <= 0:
            _fail("total_step", "an integer >= 1", self.total_step, _PEFT_TOTAL_STEP)
        self.total_step = _integer("total_step", self.total_step, minimum=1)
        self.target_r = _integer("target_r", self.target_r, minimum=0)
        # peft accepts init_r < target_r; its budget would then have to grow, and torch.kthvalue
        # crashes on the negative k. Refused here.
        self.init_r = _integer("init_r", self.init_r, minimum=self.target_r, bound_name="target_r")
        self.tinit = _integer("tinit", self.tinit, minimum=0)
        self.tfinal = _integer("tfinal", self.tfinal, minimum=0)
        self.deltaT = _integer("deltaT", self.deltaT, minimum=1)
        budgeting_end = self.total_step - self.tfinal
        if self.tinit >= budgeting_end:
            requirement = f"< total_step - tfinal = {self.total_step} - {self.tfinal} = {budgeting_end}"
            _fail("tinit", requirement, self.tinit, _PEFT_SCHEDULE)
        # peft checks the betas only in RankAllocator (an assert); checked here at once.
        self.beta1 = _real("beta1", self.beta1, "a number in the open interval (0, 1)", lambda b: 0 < b < 1)
        self.beta2 = _real("beta2", self.beta2, "a number in the open interval (0, 1)", lambda b: 0 < b < 1)
        self.orth_reg_weight = _real(
            "orth_reg_weight",
            self.orth_reg_weight,
            "a finite number >= 0",
            lambda w: w >= 0,
            f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}",
        )

    def _check_lora_fields(self) -> None:
        """The LoRA fields AdaLoRA reads, and peft's refusals of DoRA and LoftQ."""
        self.r = _integer("r", self.r, minimum=0)
        if self.r != 8:
            _warn(
                f"AdaLoraConfig.r={self.r} is ignored. Note that `r` is not used in AdaLora and will be "
                "ignored. If you intended to set the initial rank, use `init_r` instead."
            )
        self.lora_alpha = _real("lora_alpha", self.lora_alpha, "a finite number", lambda _: True)
        self.lora_dropout = _real(
            "lora_dropout", self.lora_dropout, "a number with 0 <= lora_dropout < 1", lambda p: 0 <= p < 1
        )
        for name in ("fan_in_fan_out", "inference_mode", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, "True or False", getattr(self, name))
        if self.use_dora:
            _fail("use_dora", "False", True, "PeftType.ADALORA does not support DoRA.")
        if not isinstance(self.bias, str) or self.bias not in BIAS_CHOICES:
            _fail("bias", "one of " + ", ".join(map(repr, BIAS_CHOICES)), self.bias)
        self._check_init_lora_weights()
        if self.task_type is not None and (not isinstance(self.task_type, str) or self.task_type not in TASK_TYPES):
            _fail(
                "task_type",
                "None or one of " + ", ".join(TASK_TYPES),
                self.task_type,
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                + ", ".join(TASK_TYPES)
                + ".",
            )
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            _fail("base_model_name_or_path", "a string or None", self.base_model_name_or_path)

    def _check_init_lora_weights(self) -> None:
        """True / False, or one of LoRA's named inits, which AdaLoRA's SVD layers only test for truth."""
        value = self.init_lora_weights
        if isinstance(value, bool):
            return
        if not isinstance(value, str):
            _fail("init_lora_weights", "True, False or a string", value)
        if value == "loftq":
            _fail("init_lora_weights", "anything but 'loftq'", value, "PeftType.ADALORA does not support LOFTQ.")
        _warn(
            f"AdaLoraConfig.init_lora_weights={value!r} is a LoRA initialization that AdaLoRA does not "
            f"implement: its SVD layers only test the value for truth, so it acts as {bool(value)}."
        )

    def _check_matching_fields(self) -> None:
        """target_modules, exclude_modules, modules_to_save, layers_to_transform, layers_pattern."""
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = _string_list("modules_to_save", self.modules_to_save, "a list of strings or None")
            for entry in self.modules_to_save:  # peft reads each entry as a regex when it excludes targets
                _check_regex("modules_to_save", entry, module_to_save_regex(entry))
        self.layers_to_transform = _layer_indexes(self.layers_to_transform)
        if self.layers_pattern is not None and not isinstance(self.layers_pattern, str):
            self.layers_pattern = _string_list(
                "layers_pattern", self.layers_pattern, "a string, a list of strings or None"
            )
        for pattern in layers_patterns(self.layers_pattern):
            _check_regex("layers_pattern", pattern, layer_index_regex(pattern))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            _fail(
                "layers_to_transform",
                "None when target_modules is a regex string",
                self.layers_to_transform,
                "`layers_to_transform` cannot be used when `target_modules` is a str.",
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            _fail(
                "layers_pattern",
                "None when target_modules is a regex string",
                self.layers_pattern,
                "`layers_pattern` cannot be used when `target_modules` is a str.",
            )
        if self.layers_pattern and self.layers_to_transform is None:
            _fail(
                "layers_pattern",
                "None (or empty) when layers_to_transform is None",
                self.layers_pattern,
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified.",
            )

    def _check_rank_pattern(self) -> None:
        """None, or `<module>.lora_E` -> one bool per initial rank row (True: the row is kept)."""
        if self.rank_pattern is None:
            return
        requirement = "None or a dict from module name to a list of bools"
        if not isinstance(self.rank_pattern, Mapping):
            _fail("rank_pattern", requirement, self.rank_pattern)
        for name, mask in self.rank_pattern.items():
            if not isinstance(name, str) or not isinstance(mask, list | tuple):
                _fail("rank_pattern", requirement, {name: mask})
            if not all(isinstance(keep, bool) for keep in mask):
                _fail("rank_pattern", requirement, {name: mask})
        self.rank_pattern = {name: list(mask) for name, mask in self.rank_pattern.items()}

    def _check_extra(self) -> None:
        """Keep the non-default LoRA-only fields; warn for each one that would change the math."""
        if not isinstance(self.extra, Mapping) or not all(isinstance(key, str) for key in self.extra):
            _fail("extra", "a dict with string keys", self.extra)
        clashes = sorted(set(self.extra) & (_field_names() | {"peft_type"}))
        if clashes:
            _fail("extra", "free of AdaLoraConfig's own field names and peft_type", clashes)
        kept = {}
        for key, value in self.extra.items():
            if key in PEFT_EXTRA_DEFAULTS and value == PEFT_EXTRA_DEFAULTS[key]:
                continue
            if key == "loftq_config":
                # peft drops it (LoraConfig.__post_init__) and writes {}; AdaLoRA raises only for 'loftq'.
                _warn(f"AdaLoraConfig.extra['loftq_config']={shown(value)} is dropped: {_PEFT_LOFTQ_IGNORED}")
                continue
            if key not in PEFT_EXTRA_DEFAULTS:
                _warn(f"AdaLoraConfig.extra[{key!r}] is not a peft {PEFT_VERSION} field; kept and written back.")
            elif key not in _BOOKKEEPING_FIELDS:
                _warn(
                    f"AdaLoraConfig.extra[{key!r}]={shown(value)} is a LoRA option that AdaLoRA's SVD layers "
                    "ignore; it is ignored by AdaLoRA here, kept and written back."
                )
            kept[key] = copy.deepcopy(value)
        self.extra = kept

    # ---- derived values ---------------------------------------------------------------------

    def scaling_for(self, r: int) -> float:
        """The factor SVDLinear multiplies its update by (before dividing by ranknum), for a layer of rank r.

        peft: `lora_alpha if lora_alpha > 0 else float(r)` -- not LoRA's lora_alpha / r.
        """
        r = _integer("scaling_for(r)", r, minimum=0)
        return float(self.lora_alpha) if self.lora_alpha > 0 else float(r)

    # ---- adapter_config.json ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The dict peft 0.21.2 writes as adapter_config.json for this config (a deep copy)."""
        out: dict[str, Any] = copy.deepcopy({**PEFT_EXTRA_DEFAULTS, **self.extra})
        for name in _field_names():
            out[name] = copy.deepcopy(getattr(self, name))
        out["peft_type"] = PEFT_TYPE
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaLoraConfig:
        """A config from a dict as peft writes it. Unknown keys go to `extra`.

        `peft_type` may be absent; when present it must be "ADALORA". `runtime_config` is dropped
        with a warning, as peft's `from_json_file` does (peft never saves it).
        """
        if not isinstance(data, Mapping):
            _fail("from_dict(data)", "a dict", data)
        values = dict(data)
        peft_type = values.pop("peft_type", PEFT_TYPE)
        if not isinstance(peft_type, str) or peft_type != PEFT_TYPE:
            _fail("peft_type", repr(PEFT_TYPE), peft_type)
        if "runtime_config" in values:
            del values["runtime_config"]
            _warn("adapter config has a `runtime_config` key; ignored, as peft ignores it (runtime only).")
        own = _field_names()
        kwargs = {key: value for key, value in values.items() if key in own}
        extra = {key: value for key, value in values.items() if key not in own}
        return cls(**kwargs, extra=extra)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write adapter_config.json as peft does (indent 2, sorted keys), atomically.

        The text goes to a temporary file in the same directory, is flushed to disk, then renamed
        over `path`. On any failure the old file is untouched and the temporary file is removed.
        """
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        write_atomically(Path(path), text.encode("utf-8"))

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> AdaLoraConfig:
        """Read an adapter_config.json written by peft or by `save_json`.

        A missing file raises FileNotFoundError (it names the path). Anything else wrong -- invalid
        JSON, JSON nested too deeply for Python's parser, not an object, no `peft_type` key (peft
        refuses such a file too), an invalid field -- raises ValueError starting with the path.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text: {err}") from err
        except RecursionError:
            raise ValueError(f"{path}: JSON nested too deeply to read (Python's parser ran out of stack)") from None
        except ValueError as err:  # e.g. an integer of more digits than Python converts
            raise ValueError(f"{path}: unreadable JSON value: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        if "peft_type" not in data:
            raise ValueError(f"{path}: not a peft adapter config (no `peft_type` key)")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


# ---- helpers ----------------------------------------------------------------------------------


def _field_names() -> set[str]:
    """AdaLoraConfig's own fields, as they appear in adapter_config.json (all but `extra`)."""
    return {f.name for f in fields(AdaLoraConfig)} - {"extra"}


def _fail(name: str, requirement: str, value: Any, peft_message: str = "") -> NoReturn:
    message = f"AdaLoraConfig.{name} must be {requirement}, got {shown(value)}"
    raise ValueError(f"{message}. {peft_message}" if peft_message else message)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=2)


def _integer(name: str, value: Any, minimum: int, bound_name: str = "") -> int:
    """An int (any integral type but bool) >= minimum and < 2**63, as a plain int. 12.0 and "12" are refused."""
    bound = f"{bound_name} = {minimum}" if bound_name else str(minimum)
    if not is_integer(value) or value < minimum:
        _fail(name, f"an integer >= {bound}", value)
    if value > INT64_MAX:
        _fail(name, INT64_REQUIREMENT, value)
    return int(value)


def _real(
    name: str, value: Any, requirement: str, accept: Callable[[float], bool], peft_message: str = ""
) -> int | float:
    """A finite int or float (not bool) for which `accept` holds; an int stays an int (JSON round trip)."""
    if not is_finite_real(value) or not accept(value):
        _fail(name, requirement, value, peft_message)
    return plain_real(value)


def _string_list(name: str, value: Any, requirement: str) -> list[str]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        _fail(name, requirement, value)
    if not all(isinstance(item, str) for item in value):
        _fail(name, requirement, value)
    return list(value)


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    """None, a regex string (peft matches it with re.fullmatch), or a collection of names (returned
    sorted, without duplicates)."""
    if value is None:
        return value
    if isinstance(value, str):
        _check_regex(name, value, value)
        return value
    return sorted(set(_string_list(name, value, "a list of strings, a regex string or None")))


def _check_regex(name: str, value: str, regex: str) -> None:
    """Refuse `value` when `regex` (the expression peft builds from it) does not compile."""
    try:
        re.compile(regex)
    except re.error as err:
        _fail(name, "a valid regular expression (peft matches it with the re module)", value, f"re says: {err}")
    except RecursionError:
        _fail(name, "a regular expression nested less deeply", value)


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists / tuples / dicts in `value` nest more than `limit` levels (a cycle counts as deeper).

    Walked with an explicit stack, so that a value too deep for Python's own recursion is measured too.
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            children = list(item)
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _layer_indexes(value: Any) -> list[int] | int | None:
    """layers_to_transform: None, one index, or a list of indexes (all integers >= 0)."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [_integer("layers_to_transform", index, minimum=0) for index in value]
    return _integer("layers_to_transform", value, minimum=0)
