"""Hostile input to the API: every input either works or is refused with our own clear error.

"Our own clear error" (`assert_clear_error`): exactly ValueError or TypeError, with a message, raised
by a `raise` statement inside adalora_ref -- never IndexError, ZeroDivisionError, OverflowError,
RecursionError, re.error, nor a ValueError that NumPy raises from a broadcast. "Works" means the
results are finite whenever the inputs are.

First one regression test for each failure of issue 14 (each failed before the fix), then hypothesis
fuzzing of AdaLoraConfig, SVDLinear, RankAllocator.update_and_allocate and the adapter_config readers
(`AdaLoraConfig.load_json`, `from_dict`). The fuzz tests count their inputs and outcomes and print the
counts at the end of the module's run.
"""

from __future__ import annotations

import copy
import json
import linecache
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adalora_ref
from adalora_ref._backend import is_finite_real
from adalora_ref.allocator import RankAllocator, budget_schedule
from adalora_ref.config import TASK_TYPES, AdaLoraConfig
from adalora_ref.conv import BaseConv2d, SVDConv2d
from adalora_ref.layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from adalora_ref.mlp import MLP, cross_entropy_loss, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.targets import is_module_to_save, is_target
from adalora_ref.training import train_step

PACKAGE_DIR = Path(adalora_ref.__file__).resolve().parent
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_COUNTS: dict[str, Counter[str]] = {}


def assert_clear_error(err: BaseException) -> None:
    """Exactly ValueError or TypeError, with a message, from a `raise` statement in adalora_ref."""
    assert type(err) in (ValueError, TypeError), f"a foreign exception: {type(err).__name__}: {err}"
    assert str(err), "an error without a message"
    tb = err.__traceback__
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    line = linecache.getline(filename, tb.tb_lineno).strip()
    assert Path(filename).resolve().is_relative_to(PACKAGE_DIR), f"raised outside adalora_ref: {filename}: {err}"
    assert line.startswith("raise "), f"raised by a library called at {filename}:{tb.tb_lineno} ({line}): {err}"


def attempt(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """(result, None) when `call` works; (None, error) when it raises our own clear error (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return call(), None
        except Exception as err:  # whatever it raises is judged
            assert_clear_error(err)
            return None, err


def refused(call: Callable[[], Any]) -> BaseException:
    """The clear error `call` raises (the test fails if it returns or raises anything else)."""
    _, err = attempt(call)
    if err is None:
        raise AssertionError("accepted, expected a clear refusal")
    return err


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


def cfg(**kwargs: Any) -> AdaLoraConfig:
    return AdaLoraConfig(**{"total_step": 10, "target_modules": ["fc"], **kwargs})


def linear_model(**layers: BaseLinear) -> AdaLoraModel:
    return AdaLoraModel(layers or {"fc": BaseLinear(np.ones((5, 3)), np.zeros(5))}, cfg())


def ones_grads(model: AdaLoraModel) -> dict[str, TripletGrads]:
    return {
        n: TripletGrads(*(np.ones_like(x) for x in (t.lora_A, t.lora_E, t.lora_B))) for n, t in model.triplets().items()
    }


# ---- regression tests: the failures of issue 14, one by one -----------------------------------

BAD_ALPHAS = ["8", None, math.nan, math.inf, -math.inf, True, 10**400, [8]]


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_bad_lora_alpha_is_refused_by_the_config_and_both_layers(alpha: Any) -> None:
    """NaN used to become scaling = r (NaN > 0 is false), inf gave inf outputs, "8" a TypeError from `>`."""
    assert "AdaLoraConfig.lora_alpha must be a finite number" in str(refused(lambda: cfg(lora_alpha=alpha)))
    triplet = init_triplet(np.random.default_rng(0), 2, 3, 4)
    err = refused(lambda: SVDLinear(np.ones((4, 3)), None, triplet, lora_alpha=alpha, name="fc"))
    assert f"fc[default].lora_alpha must be a finite number (int or float), got {alpha!r}"[:60] in str(err)
    conv_triplet = init_triplet(np.random.default_rng(0), 2, 3 * 2 * 2, 4)
    err = refused(lambda: SVDConv2d(np.ones((4, 3, 2, 2)), None, conv_triplet, lora_alpha=alpha, name="conv"))
    assert "conv[default].lora_alpha must be a finite number" in str(err)


def test_negative_lora_alpha_is_accepted_as_peft_does() -> None:
    """peft 0.21.2 accepts lora_alpha < 0 and uses scaling = r (checked: scaling {'default': 12.0})."""
    assert cfg(lora_alpha=-2).lora_alpha == -2
    layer = SVDLinear(np.ones((4, 3)), None, init_triplet(np.random.default_rng(0), 2, 3, 4), lora_alpha=-2)
    assert layer.scaling == 2.0
    assert type(SVDLinear(np.ones((4, 3)), None, layer.triplet, lora_alpha=np.float64(3.0)).scaling) is float


def test_bad_ranknum_is_refused() -> None:
    triplet = init_triplet(np.random.default_rng(0), 2, 3, 4)
    for ranknum in (math.nan, -1.0, "2"):
        err = refused(lambda r=ranknum: SVDLinear(np.ones((4, 3)), None, triplet, lora_alpha=8, ranknum=r))
        assert "layer[default].ranknum must be None or a finite number >= 0" in str(err)


@pytest.mark.parametrize("shape", [(3,), (3, 3, 3)])
@pytest.mark.parametrize("adapted", [True, False])
def test_a_base_weight_that_is_not_2d_is_refused(shape: tuple[int, ...], adapted: bool) -> None:
    """Was `too many values to unpack` (adapted) or an error at the first forward (not adapted)."""
    layers = {"fc": BaseLinear(np.ones((5, 3))), "head": BaseLinear(np.ones((2, 5)))}
    layers["fc" if adapted else "head"] = BaseLinear(np.ones(shape))
    err = refused(lambda: AdaLoraModel(layers, cfg()))
    assert f"{'fc' if adapted else 'head'}.weight must be 2-D (out, in), got shape {shape}" in str(err)


def test_a_conv_kernel_that_is_not_4d_is_refused() -> None:
    layers = {"fc": BaseLinear(np.ones((5, 3))), "conv": BaseConv2d(np.ones((4, 3, 2)))}
    assert "conv.weight must be 4-D" in str(refused(lambda: AdaLoraModel(layers, cfg())))


def test_a_bias_of_the_wrong_length_is_refused_at_construction() -> None:
    """An unadapted layer's bias used to fail with NumPy's broadcast error at the first forward."""
    layers = {"fc": BaseLinear(np.ones((5, 3))), "head": BaseLinear(np.ones((2, 5)), np.zeros(4))}
    assert "head.bias has shape (4,), expected (2,)" in str(refused(lambda: AdaLoraModel(layers, cfg())))
    fan = {"fc": BaseLinear(np.ones((3, 5)), np.zeros(3))}  # fan_in_fan_out: (in, out), so the bias is (5,)
    err = refused(lambda: AdaLoraModel(fan, cfg(fan_in_fan_out=True)))
    assert "fc.bias has shape (3,), expected (5,)" in str(err)
    convs = {"fc": BaseLinear(np.ones((5, 3))), "conv": BaseConv2d(np.ones((4, 3, 2, 2)), np.zeros(3))}
    assert "conv.bias has shape (3,), expected (4,)" in str(refused(lambda: AdaLoraModel(convs, cfg())))


def test_a_bad_conv_geometry_is_refused_at_construction() -> None:
    """padding=None used to end in `'NoneType' object is not iterable` at the first forward."""
    for geometry, message in (({"padding": None}, "padding must be an int or a pair"), ({"stride": 0}, "stride")):
        layers = {"fc": BaseLinear(np.ones((5, 3))), "conv": BaseConv2d(np.ones((4, 3, 2, 2)), **geometry)}
        assert message in str(refused(lambda layers=layers: AdaLoraModel(layers, cfg())))


def test_an_empty_batch_is_refused_by_both_losses_and_by_train_step() -> None:
    """mse_loss used to raise ZeroDivisionError; cross_entropy_loss returned NaN."""
    assert "the batch is empty (y has shape (0, 5))" in str(
        refused(lambda: mse_loss(np.zeros((0, 5)), np.zeros((0, 5))))
    )
    labels = np.zeros(0, dtype=np.int64)
    err = refused(lambda: cross_entropy_loss(np.zeros((0, 5)), labels))
    assert "the batch is empty (logits have shape (0, 5))" in str(err)
    model = linear_model()
    before = copy.deepcopy(model.triplets())
    net = MLP(model)
    err = refused(lambda: train_step(net, AdamW(lr=0.1), np.zeros((0, 3)), np.zeros((0, 5)), 1, mse_loss))
    assert "(0, 5)" in str(err)
    for name, triplet in model.triplets().items():
        np.testing.assert_array_equal(triplet.lora_A, before[name].lora_A)


def test_float_labels_are_refused() -> None:
    """Labels 0.5 used to pass the range check (int(0.5) == 0) and give a wrong loss silently."""
    assert "labels must be integers" in str(refused(lambda: cross_entropy_loss(np.zeros((2, 3)), np.array([0.5, 1.0]))))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", "fc("),
        ("exclude_modules", "[a"),
        ("modules_to_save", ["he("]),
        ("layers_pattern", "la("),
        ("layers_pattern", ["(?P<idx>x)"]),  # compiles alone, not inside peft's regex (a second group idx)
    ],
)
def test_an_invalid_regex_is_refused_by_the_config(field: str, value: Any) -> None:
    """Accepted before, then failed in `re` (peft 0.21.2 fails there too, at get_peft_model)."""
    extra = {"layers_to_transform": [0], "target_modules": ["q"]} if field == "layers_pattern" else {}
    err = refused(lambda: cfg(**{**extra, field: value}))
    assert f"AdaLoraConfig.{field} must be a valid regular expression" in str(err)
    assert "re says:" in str(err)


@pytest.mark.parametrize("step", [-1, 2.0, 1.5, True, "3", None])
def test_a_step_that_is_not_a_non_negative_int_is_refused(step: Any) -> None:
    """-1, 1.5 and True used to be accepted, "3" gave `'<' not supported`."""
    model = linear_model()
    assert str(refused(lambda: model.update_and_allocate(step, ones_grads(model)))).startswith("global_step must be")
    allocator = model.allocator
    assert allocator is not None
    err = refused(lambda: allocator.update_and_allocate(model.triplets(), ones_grads(model), step))
    assert str(err).startswith("global_step must be an integer >= 0")
    kw = {"init_bgt": 4, "target_bgt": 2, "tinit": 0, "tfinal": 0, "total_step": 10, "deltaT": 1}
    assert str(refused(lambda: budget_schedule(step, **kw))).startswith("step must be an integer >= 0")


def test_step_zero_and_numpy_integers_are_valid_steps() -> None:
    model = linear_model()
    assert model.update_and_allocate(0, ones_grads(model)).budget == 12
    assert model.update_and_allocate(np.int64(1), ones_grads(model)) is not None


def test_a_deeply_nested_adapter_config_is_refused_naming_the_file(tmp_path: Path) -> None:
    """json.loads used to raise RecursionError; a value nested 900 deep overflowed the stack on copy."""
    path = tmp_path / "adapter_config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert str(refused(lambda: AdaLoraConfig.load_json(path))) == f"{path}: JSON nested too deeply to read " + (
        "(Python's parser ran out of stack)"
    )
    path.write_text('{"peft_type": "ADALORA", "total_step": 10, "eva_config": ' + "[" * 900 + "]" * 900 + "}")
    err = refused(lambda: AdaLoraConfig.load_json(path))
    assert str(err).startswith(f"{path}: AdaLoraConfig.extra must be nested at most 100 levels deep")
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    assert "target_modules must be nested at most 100" in str(refused(lambda: cfg(target_modules=deep)))


def test_malformed_adapter_config_values_are_refused_naming_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "adapter_config.json"
    for text, field in (
        ('{"peft_type": "ADALORA", "total_step": 1' + "0" * 5000 + "}", "unreadable JSON value"),
        ('{"peft_type": ["ADALORA"], "total_step": 10}', "AdaLoraConfig.peft_type"),
        ('{"peft_type": "ADALORA", "total_step": 10, "bias": ["none"]}', "AdaLoraConfig.bias"),
        ('{"peft_type": "ADALORA", "total_step": 10, "task_type": {"a": 1}}', "AdaLoraConfig.task_type"),
        ('{"peft_type": "ADALORA", "total_step": 10, "beta1": 1' + "0" * 400 + "}", "AdaLoraConfig.beta1"),
        ("[1, 2]", "expected a JSON object"),
    ):
        path.write_text(text)
        err = refused(lambda: AdaLoraConfig.load_json(path))
        assert str(err).startswith(f"{path}: ") and field in str(err), str(err)


def test_a_huge_integer_is_refused_as_not_finite() -> None:
    """math.isfinite(10**400) raises OverflowError: it used to escape from every float field."""
    for field in ("lora_alpha", "beta1", "orth_reg_weight", "lora_dropout"):
        err = refused(lambda f=field: cfg(**{f: 10**400}))
        assert f"AdaLoraConfig.{field} must be" in str(err) and "<an integer of 1329 bits>" in str(err)


def test_an_integer_too_long_to_print_is_described_in_the_error() -> None:
    """repr() refuses an int of more than 4300 digits (ValueError): the layers', the step check's and
    conv's errors, and the config's warning for an extra field, used to fail in their own f-string
    with Python's message, naming no field."""
    huge, described, negative = 10**5000, "<an integer of 16610 bits>", "<a negative integer of 16610 bits>"
    triplet = init_triplet(np.random.default_rng(0), 2, 3, 4)
    err = refused(lambda: SVDLinear(np.ones((4, 3)), None, triplet, lora_alpha=huge, name="fc"))
    assert str(err) == f"fc[default].lora_alpha must be a finite number (int or float), got {described}"
    err = refused(lambda: SVDLinear(np.ones((4, 3)), None, triplet, lora_alpha=8, ranknum=-huge, name="fc"))
    assert str(err) == f"fc[default].ranknum must be None or a finite number >= 0, got {negative}"
    model = linear_model()
    err = refused(lambda: model.update_and_allocate(huge, ones_grads(model)))
    assert str(err) == f"global_step must be an integer < 2**63 (a port stores it in int64), got {described}"
    for geometry, message in (
        ({"groups": huge}, f"conv: groups = {described} is not supported (only groups = 1)"),
        ({"stride": (1, -huge)}, f"conv: stride must be >= 1, got (1, {negative})"),
    ):
        layers = {"fc": BaseLinear(np.ones((5, 3))), "conv": BaseConv2d(np.ones((4, 3, 2, 2)), **geometry)}
        assert str(refused(lambda layers=layers: AdaLoraModel(layers, cfg()))) == message
    with pytest.warns(UserWarning, match=f"AdaLoraConfig.extra\\['use_rslora'\\]={described} is a LoRA option"):
        cfg(extra={"use_rslora": huge})


def test_the_allocator_refuses_inconsistent_triplets() -> None:
    """An A of the wrong row count used to end in NumPy's broadcast error; a 1-D E in IndexError."""
    allocator = RankAllocator({"fc": 2}, target_r=1, tinit=0, tfinal=0, total_step=10)
    good = SVDTriplet(np.ones((2, 3)), np.ones((2, 1)), np.ones((4, 2)))

    def run(triplet: SVDTriplet, grads: Any = None) -> Any:
        g = grads or TripletGrads(*(np.ones_like(x) for x in (triplet.lora_A, triplet.lora_E, triplet.lora_B)))
        return allocator.update_and_allocate({"fc": triplet}, {"fc": g}, 1)

    assert "fc.lora_A has shape (3, 3), expected (2, 3)" in str(
        refused(lambda: run(SVDTriplet(np.ones((3, 3)), good.lora_E, good.lora_B)))
    )
    assert "fc.lora_E must be 2-D" in str(refused(lambda: run(SVDTriplet(good.lora_A, np.ones(2), good.lora_B))))
    ints = SVDTriplet(*(np.ones(x.shape, dtype=np.int64) for x in (good.lora_A, good.lora_E, good.lora_B)))
    assert "only float32 and float64" in str(refused(lambda: run(ints)))
    f32 = TripletGrads(np.ones((2, 3), np.float32), np.ones((2, 1)), np.ones((4, 2)))
    assert "fc.lora_A grad has dtype float32, expected float64" in str(refused(lambda: run(good, f32)))
    empty_in = SVDTriplet(np.ones((2, 0)), good.lora_E, good.lora_B)
    assert "leave no entries to average" in str(refused(lambda: run(empty_in)))
    assert "must be a TripletGrads" in str(
        refused(lambda: allocator.update_and_allocate({"fc": good}, {"fc": None}, 1))
    )


def test_scores_that_overflow_are_refused_at_the_masking_step() -> None:
    """Finite importances 1e20 give scores 1e40 = inf in float32: every row would tie at inf and go."""
    allocator = RankAllocator({"fc": 2}, target_r=1, tinit=0, tfinal=0, total_step=10)
    big = SVDTriplet(*(np.full(s, 1e10, np.float32) for s in ((2, 3), (2, 1), (4, 2))))
    grads = TripletGrads(big.lora_A, big.lora_E, big.lora_B)
    small = SVDTriplet(*(np.full(s, 1.0, np.float32) for s in ((2, 3), (2, 1), (4, 2))))
    allocator.update_and_allocate({"fc": small}, {"fc": TripletGrads(small.lora_A, small.lora_E, small.lora_B)}, 1)
    before = copy.deepcopy((allocator.state, allocator.last_step))
    err = refused(lambda: allocator.update_and_allocate({"fc": big}, {"fc": grads}, 2))
    assert "the importance scores of ['fc'] overflow" in str(err)
    assert _same_state(before, (allocator.state, allocator.last_step))  # the averages did not move


# ---- fuzzing -----------------------------------------------------------------------------------

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
                assert _same_state(before, (allocator.state, allocator.last_step)), err  # nothing moved
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


def _same_state(a: Any, b: Any) -> bool:
    (state_a, step_a), (state_b, step_b) = a, b
    if step_a != step_b or state_a.keys() != state_b.keys():
        return False
    return all(
        np.array_equal(getattr(state_a[n][p], f), getattr(state_b[n][p], f), equal_nan=True)
        for n in state_a
        for p in state_a[n]
        for f in ("ipt", "exp_avg_ipt", "exp_avg_unc")
    )


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
