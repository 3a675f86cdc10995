"""Hostile input to the API: every input either works or is refused with our own clear error.

"Our own clear error" (`assert_clear_error`): exactly ValueError or TypeError, with a message, raised
by a `raise` statement inside adalora_ref -- never IndexError, ZeroDivisionError, OverflowError,
RecursionError, re.error, nor a ValueError that NumPy raises from a broadcast. "Works" means the
results are finite whenever the inputs are.

Here, one regression test for each failure of issue 14 (each failed before the fix), and the helpers
that judge an outcome; the hypothesis fuzzing of the same entry points is in test_hostile_api_fuzz.py.
"""

from __future__ import annotations

import copy
import linecache
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import adalora_ref
from adalora_ref.allocator import RankAllocator, budget_schedule
from adalora_ref.config import AdaLoraConfig
from adalora_ref.conv import BaseConv2d, SVDConv2d
from adalora_ref.layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from adalora_ref.mlp import MLP, cross_entropy_loss, mse_loss
from adalora_ref.model import AdaLoraModel, BaseLinear
from adalora_ref.optim import AdamW
from adalora_ref.training import train_step

PACKAGE_DIR = Path(adalora_ref.__file__).resolve().parent


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


def cfg(**kwargs: Any) -> AdaLoraConfig:
    return AdaLoraConfig(**{"total_step": 10, "target_modules": ["fc"], **kwargs})


def linear_model() -> AdaLoraModel:
    """One adapted linear layer, fc (5, 3) with a bias."""
    return AdaLoraModel({"fc": BaseLinear(np.ones((5, 3)), np.zeros(5))}, cfg())


def ones_grads(model: AdaLoraModel) -> dict[str, TripletGrads]:
    return {
        n: TripletGrads(*(np.ones_like(x) for x in (t.lora_A, t.lora_E, t.lora_B))) for n, t in model.triplets().items()
    }


def same_state(a: Any, b: Any) -> bool:
    """Whether two (allocator.state, allocator.last_step) snapshots hold the same step and arrays."""
    (state_a, step_a), (state_b, step_b) = a, b
    if step_a != step_b or state_a.keys() != state_b.keys():
        return False
    return all(
        np.array_equal(getattr(state_a[n][p], f), getattr(state_b[n][p], f), equal_nan=True)
        for n in state_a
        for p in state_a[n]
        for f in ("ipt", "exp_avg_ipt", "exp_avg_unc")
    )


# ---- regression tests: the failures of issue 14, one by one -----------------------------------

BAD_ALPHAS = ["8", None, math.nan, math.inf, -math.inf, True, 10**400, [8]]


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_bad_lora_alpha_is_refused_by_the_config_and_both_layers(alpha: Any) -> None:
    """NaN used to become scaling = r (NaN > 0 is false), inf gave inf outputs, "8" a TypeError from `>`."""
    assert "AdaLoraConfig.lora_alpha must be a finite number" in str(refused(lambda: cfg(lora_alpha=alpha)))
    triplet = init_triplet(np.random.default_rng(0), 2, 3, 4)
    err = refused(lambda: SVDLinear(np.ones((4, 3)), None, triplet, lora_alpha=alpha, name="fc"))
    assert str(err).startswith("fc[default].lora_alpha must be a finite number (int or float), got ")
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
    assert same_state(before, (allocator.state, allocator.last_step))  # the averages did not move
