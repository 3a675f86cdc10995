"""Hypothesis fuzzing of the API's entry points: every input either works or is refused with our own
clear error (test_hostile_api.assert_clear_error), and an accepted input gives finite results.

Fuzzed: AdaLoraConfig, SVDLinear (construction, forward, backward), RankAllocator.update_and_allocate
(a refused step leaves no trace) and the adapter_config readers (`AdaLoraConfig.load_json`,
`from_dict`). Each test counts its inputs and outcomes; the counts are printed at the end of the
module's run.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adalora_ref._backend import is_finite_real
from adalora_ref.allocator import RankAllocator
from adalora_ref.config import TASK_TYPES, AdaLoraConfig
from adalora_ref.layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from adalora_ref.targets import is_module_to_save, is_target

from .test_hostile_api import attempt, cfg, same_state

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_COUNTS: dict[str, Counter[str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_fuzz_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for target, counts in FUZZ_COUNTS.items():
            outcomes = ", ".join(f"{outcome} {n}" for outcome, n in sorted(counts.items()))
            reporter.write_line(f"fuzz {target}: {sum(counts.values())} inputs: {outcomes}")


HOSTILE = st.one_of(
    st.sampled_from([None, True, False, "8", "", math.nan, math.inf, -math.inf, 10**400, [], {}, [1], {"a": 1}]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
)
REGEX_TEXT = st.text(alphabet="fcq.*+?()[]|\\^$", max_size=6)
NAMES = st.lists(st.sampled_from(["fc", "q", "head", "layers.0.q", "x("]), max_size=3)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


VALID_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "target_r": st.integers(0, 10),
    "init_r": st.integers(6, 16),
    "tinit": st.integers(0, 40),
    "tfinal": st.integers(0, 40),
    "deltaT": st.integers(1, 10),
    "beta1": st.floats(0.01, 0.99),
    "beta2": st.floats(0.01, 0.99),
    "orth_reg_weight": st.floats(0, 2),
    "rank_pattern": st.none() | st.dictionaries(st.text(max_size=4), st.lists(st.booleans(), max_size=4)),
    "r": st.integers(0, 16),
    "lora_alpha": st.floats(-100, 100) | st.integers(-8, 64),
    "lora_dropout": st.floats(0, 0.99),
    "fan_in_fan_out": st.booleans(),
    "bias": st.sampled_from(["none", "all", "lora_only"]),
    "target_modules": NAMES | REGEX_TEXT,
    "exclude_modules": st.none() | NAMES | REGEX_TEXT,
    "init_lora_weights": st.booleans() | st.sampled_from(["gaussian", "loftq"]),
    "modules_to_save": st.none() | NAMES,
    "layers_to_transform": st.none() | st.integers(0, 3) | st.lists(st.integers(0, 3), max_size=3),
    "layers_pattern": st.none() | st.none() | REGEX_TEXT,
    "inference_mode": st.booleans(),
    "use_dora": st.booleans(),
    "base_model_name_or_path": st.none() | st.text(max_size=4),
    "task_type": st.sampled_from([None, *TASK_TYPES]),
    "extra": st.dictionaries(st.sampled_from(["use_rslora", "loftq_config", "revision", "x"]), JSON_VALUES),
}


@st.composite
def config_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid values for some fields (total_step among them), then up to two fields given hostile values."""
    kwargs = draw(st.fixed_dictionaries({"total_step": st.integers(50, 200)}, optional=VALID_FIELDS))
    for name in draw(st.lists(st.sampled_from(["total_step", *VALID_FIELDS]), max_size=2, unique=True)):
        kwargs[name] = draw(HOSTILE)
    return kwargs


NUMERIC_FIELDS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
                  "r", "lora_alpha", "lora_dropout")  # fmt: skip


def _check_a_valid_config(config: AdaLoraConfig) -> None:
    """An accepted config: finite numbers, scales finitely, matches names (or refuses clearly, as for
    target_modules None), and reads back what it writes (its warnings silenced; an error fails)."""
    assert all(is_finite_real(getattr(config, name)) for name in NUMERIC_FIELDS)
    assert math.isfinite(config.scaling_for(config.init_r))
    for name in ("fc", "model.layers.0.q", "x(", "head"):
        attempt(lambda name=name: (is_target(config, name), is_module_to_save(config, name)))
    text = json.dumps(config.to_dict(), sort_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = AdaLoraConfig.from_dict(json.loads(text))
    assert json.dumps(again.to_dict(), sort_keys=True) == text


def test_fuzz_adalora_config() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(config_kwargs())
    def run(kwargs: dict[str, Any]) -> None:
        config, err = attempt(lambda: AdaLoraConfig(**kwargs))
        counts["refused" if err else "worked"] += 1
        if config is not None:
            _check_a_valid_config(config)

    run()
    FUZZ_COUNTS["AdaLoraConfig(**kwargs)"] = counts
    assert counts["worked"] > 0 and counts["refused"] > 0, counts


def _small_shape(ndim: st.SearchStrategy[int]) -> st.SearchStrategy[tuple[int, ...]]:
    return ndim.flatmap(lambda n: st.tuples(*[st.integers(0, 4)] * n))


SVD_DAMAGES = (
    "weight shape",
    "weight dtype",
    "bias shape",
    "lora_alpha",
    "ranknum",
    "x shape",
    "x dtype",
    "x NaN / Inf",
)


@st.composite
def svd_linear_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid layer and input (any sizes, empty ones included), then up to two things damaged: a
    shape, a dtype, lora_alpha or ranknum hostile, a NaN or Inf in the input."""
    damaged = draw(st.lists(st.sampled_from(SVD_DAMAGES), max_size=2, unique=True))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    n_out, n_in, r = draw(st.integers(0, 5)), draw(st.integers(0, 5)), draw(st.integers(0, 4))
    fan = draw(st.booleans())
    weight_shape = (n_in, n_out) if fan else (n_out, n_in)
    bias_shape = draw(st.sampled_from([None, (n_out,)]))
    x_shape = (*draw(st.lists(st.integers(0, 3), max_size=2)), n_in)
    scale = draw(st.sampled_from([1.0, 1.0, 1e3]))
    triplet = init_triplet(np.random.default_rng(draw(st.integers(0, 3))), r, n_in, n_out, dtype=dtype)
    triplet.lora_E = triplet.lora_E + draw(st.floats(-2, 2))  # E != 0: the adapter adds something
    case = {
        "weight": np.full(weight_shape, 0.5 * scale, dtype=dtype),
        "bias": None if bias_shape is None else np.full(bias_shape, 0.1, dtype=dtype),
        "triplet": triplet,
        "alpha": draw(st.floats(-1e3, 1e3) | st.integers(-4, 64)),
        "ranknum": draw(st.none() | st.floats(0, 8)),
        "fan": fan,
        "x": np.full(x_shape, scale, dtype=dtype),
    }
    wrong_dtype = draw(st.sampled_from([np.float16, np.int64, np.float32 if dtype == np.float64 else np.float64]))
    for damage in damaged:
        if damage == "weight shape":
            case["weight"] = np.ones(draw(_small_shape(st.integers(0, 3))), dtype=dtype)
        elif damage == "weight dtype":
            case["weight"] = case["weight"].astype(wrong_dtype)
        elif damage == "bias shape":
            case["bias"] = np.zeros(draw(_small_shape(st.integers(0, 2))), dtype=dtype)
        elif damage in ("lora_alpha", "ranknum"):
            case["alpha" if damage == "lora_alpha" else "ranknum"] = draw(HOSTILE)
        elif damage == "x shape":
            case["x"] = np.ones(draw(_small_shape(st.integers(0, 3))), dtype=dtype)
        elif damage == "x dtype":
            case["x"] = case["x"].astype(wrong_dtype)
        elif case["x"].size and np.issubdtype(case["x"].dtype, np.floating):
            case["x"].flat[0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return case


def test_fuzz_svd_linear() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(svd_linear_inputs())
    def run(case: dict[str, Any]) -> None:
        layer, err = attempt(
            lambda: SVDLinear(
                case["weight"],
                case["bias"],
                case["triplet"],
                lora_alpha=case["alpha"],
                fan_in_fan_out=case["fan"],
                ranknum=case["ranknum"],
                name="fc",
            )
        )
        if err is not None:
            counts["refused at construction"] += 1
            return
        x = case["x"]
        forward, err = attempt(lambda: layer.forward(x))
        if err is not None:
            counts["refused at forward"] += 1
            return
        y, cache = forward
        assert y.shape == (*x.shape[:-1], layer.out_features)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf inputs propagate, as in torch
            grad_x, grads = layer.backward(cache, np.ones_like(y))
        assert grad_x.shape == x.shape
        outputs = [y, grad_x] + ([] if grads is None else [grads.lora_A, grads.lora_E, grads.lora_B])
        finite_in = np.isfinite(x).all() and abs(case["alpha"]) <= 1e6
        if finite_in:  # moderate finite inputs (|x| <= 1e3, |W| <= 500, |alpha| <= 1e6): finite results
            assert all(np.isfinite(out).all() for out in outputs)
            counts["worked"] += 1
        else:
            counts["worked, NaN / Inf or |lora_alpha| > 1e6 in, results not checked"] += 1

    run()
    FUZZ_COUNTS["SVDLinear (construction, forward, backward)"] = counts
    assert counts["worked"] > 0 and counts["refused at construction"] > 0 and counts["refused at forward"] > 0, counts


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any], in_ten: int = 9) -> st.SearchStrategy[Any]:
    """`valid` in `in_ten` draws out of ten, `hostile` in the others."""
    return st.integers(0, 9).flatmap(lambda k: valid if k < in_ten else hostile)


def steps_for(total_step: int) -> st.SearchStrategy[Any]:
    """Step numbers: mostly ints from 0 to a little past total_step; some negative or not ints at all."""
    hostile = st.integers(-3, -1) | st.sampled_from([2.0, True, "3", None, math.nan])
    return mostly(st.integers(0, total_step + 2), hostile)


ALLOCATOR_DAMAGES = ("a shape", "no inputs", "grad dtype", "huge values", "NaN / Inf", "steps unsorted")


@st.composite
def allocator_inputs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid schedule and matching triplets and gradients, then up to two damages (a shape, a
    layer with no inputs, a gradient's dtype, values huge or not finite, steps out of order);
    steps are mostly valid integers, some negative or not integers."""
    damaged = draw(st.lists(st.sampled_from(ALLOCATOR_DAMAGES), max_size=2, unique=True))
    total_step = draw(st.integers(2, 30))
    tfinal = draw(st.integers(0, total_step - 1))
    init_r = draw(st.integers(0, 4))
    config = cfg(
        total_step=total_step,
        tfinal=tfinal,
        tinit=draw(st.integers(0, total_step - tfinal - 1)),
        deltaT=draw(st.integers(1, 4)),
        init_r=init_r,
        target_r=draw(st.integers(0, init_r)),
    )
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    layers = {}
    for k in range(draw(st.integers(1, 3))):
        n_in, n_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        layers[f"l{k}"] = [(init_r, n_in), (init_r, 1), (n_out, init_r)]
    first = layers["l0"]
    if "a shape" in damaged:
        first[draw(st.integers(0, 2))] = draw(_small_shape(st.integers(0, 3)))
    if "no inputs" in damaged:
        first[0] = (init_r, 0)
    steps = draw(st.lists(steps_for(total_step), min_size=1, max_size=6))
    if "steps unsorted" not in damaged:
        steps = sorted(steps, key=lambda s: s if isinstance(s, int) and not isinstance(s, bool) else -1)
    return {
        "config": config,
        "dtype": dtype,
        "layers": layers,
        "grad_dtype": np.float16 if "grad dtype" in damaged else dtype,
        "magnitude": draw(st.sampled_from([1e20, 1e200])) if "huge values" in damaged else 1.0,
        "poison": draw(st.sampled_from([math.nan, math.inf])) if "NaN / Inf" in damaged else None,
        "steps": steps,
        "seed": draw(st.integers(0, 2**16)),
    }


def test_fuzz_rank_allocator_update_and_allocate() -> None:
    counts: Counter[str] = Counter()

    @FUZZ
    @given(allocator_inputs())
    def run(case: dict[str, Any]) -> None:
        rng = np.random.default_rng(case["seed"])

        def values(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            with np.errstate(over="ignore"):  # 1e200 becomes inf in float32: a non-finite input
                return np.asarray(rng.normal(size=shape) * case["magnitude"]).astype(dtype)

        layers = case["layers"]
        params = {n: SVDTriplet(*(values(s, case["dtype"]) for s in shapes)) for n, shapes in layers.items()}
        grads = {n: TripletGrads(*(values(s, case["grad_dtype"]) for s in shapes)) for n, shapes in layers.items()}
        if case["poison"] is not None:
            next(iter(grads.values())).lora_B.flat[:1] = case["poison"]
        allocator = RankAllocator.from_config(case["config"], dict.fromkeys(layers, case["config"].init_r))
        for step in case["steps"]:
            before = copy.deepcopy((allocator.state, allocator.last_step))
            allocation, err = attempt(lambda step=step: allocator.update_and_allocate(params, grads, step))
            if err is not None:
                counts["refused"] += 1
                assert same_state(before, (allocator.state, allocator.last_step)), err  # nothing moved
                continue
            counts["worked"] += 1
            assert isinstance(allocation.budget, int)
            if allocation.masked:
                assert allocation.threshold == -math.inf or math.isfinite(allocation.threshold)
                for name, triplet in params.items():
                    assert np.isfinite(allocation.scores[name]).all()
                    assert len(allocation.rank_pattern[name]) == triplet.r
                    assert not np.isfinite(triplet.lora_E).all() or np.isfinite(allocation.lora_E[name]).all()

    run()
    FUZZ_COUNTS["RankAllocator.update_and_allocate (calls, 1 to 6 steps an allocator)"] = counts
    assert counts["worked"] > 0 and counts["refused"] > 0, counts


CONFIG_JSON = st.builds(
    lambda kwargs, peft_type, more: {**kwargs, "peft_type": peft_type, **more},
    config_kwargs(),
    mostly(st.just("ADALORA"), HOSTILE),
    st.fixed_dictionaries({}, optional={"runtime_config": JSON_VALUES, "junk": JSON_VALUES}),
)


@st.composite
def adapter_config_texts(draw: st.DrawFn) -> bytes:
    """adapter_config.json contents: fuzzed configs as JSON, JSON of any shape, deep nesting, huge
    numbers, JSON's non-standard NaN / Infinity, truncated text, and bytes that are not UTF-8."""
    kind = draw(st.sampled_from(["config", "config", "config", "json", "deep", "number", "broken", "bytes"]))
    if kind == "config":
        return json.dumps(draw(CONFIG_JSON), default=str).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([50, 150, 900, 5000, 100_000]))
        return ('{"peft_type": "ADALORA", "total_step": 10, "x": ' + "[" * depth + "]" * depth + "}").encode()
    if kind == "number":
        number = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 5000, "-0", "12.0"]))
        field = draw(st.sampled_from(["total_step", "lora_alpha", "beta1", "init_r"]))
        return f'{{"peft_type": "ADALORA", "total_step": 10, "{field}": {number}}}'.encode()
    if kind == "broken":
        text = json.dumps(draw(CONFIG_JSON), default=str)
        return text[: draw(st.integers(0, max(0, len(text) - 1)))].encode()
    return draw(st.binary(max_size=40))


def test_fuzz_adapter_config_readers(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    file_counts: Counter[str] = Counter()
    dict_counts: Counter[str] = Counter()

    @FUZZ
    @given(adapter_config_texts(), mostly(CONFIG_JSON, JSON_VALUES, in_ten=8))
    def run(text: bytes, data: Any) -> None:
        path.write_bytes(text)
        config, err = attempt(lambda: AdaLoraConfig.load_json(path))
        file_counts["refused" if err else "worked"] += 1
        assert err is None or (type(err) is ValueError and str(err).startswith(f"{path}: ")), err
        if config is not None:
            _check_a_valid_config(config)
        config, err = attempt(lambda: AdaLoraConfig.from_dict(data))
        dict_counts["refused" if err else "worked"] += 1
        assert err is None or str(err).startswith("AdaLoraConfig."), err
        if config is not None:
            _check_a_valid_config(config)

    run()
    FUZZ_COUNTS["AdaLoraConfig.load_json (files)"] = file_counts
    FUZZ_COUNTS["AdaLoraConfig.from_dict (dicts and other values)"] = dict_counts
    assert file_counts["worked"] > 0 and file_counts["refused"] > 0, file_counts
    assert dict_counts["worked"] > 0 and dict_counts["refused"] > 0, dict_counts
