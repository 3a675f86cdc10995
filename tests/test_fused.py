"""The fused allocator step (adalora_ref/fused.py) against the readable one (allocator.py).

- the averages: ipt, exp_avg_ipt and exp_avg_unc bitwise equal, float32 and float64, on shapes with
  r = 0 layers and one-feature layers, and over values drawn by hypothesis;
- the triplet scores: within a few ulps of the exact scores (fractions) of the same element scores,
  1e-15 relative in float64, and as close to the readable path's as its own BLAS sums allow;
- the refusals: NaN / Inf, overflowing scores and the all-or-nothing rule, by the readable path's own
  tests run again with the fused allocator in its place, and a step-by-step twin comparison;
- conformance: every allocator and trajectory golden case passes with the fused allocator in the model;
- the benchmark workload: both allocators give the same numbers.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the fused path needs numba: pip install 'adalora-ref[fast]'")

import adalora_ref
from adalora_ref import bench, bench_measure
from adalora_ref import model as model_module
from adalora_ref._backend import get_backend
from adalora_ref.allocator import PARTS, RankAllocator
from adalora_ref.conformance.case import bundled_cases_dir
from adalora_ref.conformance.runner import run_cases
from adalora_ref.fused import FusedPathError, FusedRankAllocator
from adalora_ref.layer import SVDTriplet, TripletGrads

from . import test_allocator, test_hostile_api, test_hostile_api_fuzz, test_training_faults
from .conftest import Backend

QUANTITIES = ("ipt", "exp_avg_ipt", "exp_avg_unc")
SCHEDULE = {"target_r": 1, "tinit": 0, "tfinal": 0, "total_step": 100, "deltaT": 1}
DTYPES = (np.float32, np.float64)

LAYERS = {
    "wide": (4, 7, 9),  # (r, in, out)
    "empty": (0, 3, 5),  # r = 0: no rows, no scores
    "one_feature": (2, 1, 1),  # one input and one output feature
    "tall": (3, 2, 40),
    "deberta_fc1": (12, 768, 3072),  # the benchmark's largest layer: sums over 768 and 3072 elements
}


def draw_triplets(rng: np.random.Generator, layers: dict[str, tuple[int, int, int]], dtype: Any, scale: float) -> dict:
    return {
        name: [rng.normal(0, scale, shape).astype(dtype) for shape in ((r, n_in), (r, 1), (n_out, r))]
        for name, (r, n_in, n_out) in layers.items()
    }


def exact_scores(allocator: RankAllocator) -> dict[str, list[Fraction]]:
    """s_E[i] + (mean_j s_A[i, j] + mean_k s_B[k, i]) in exact arithmetic, from the element scores
    exp_avg_ipt * exp_avg_unc rounded in the dtype (the same on both paths: the averages are)."""
    out = {}
    for name, states in allocator.state.items():
        s = {part: [[Fraction(float(v)) for v in row] for row in states[part].exp_avg_ipt * states[part].exp_avg_unc]
             for part in PARTS}  # fmt: skip
        n_in, n_out = len(s["lora_A"][0]) if s["lora_A"] else 0, len(s["lora_B"])
        out[name] = [
            s["lora_E"][i][0] + (sum(s["lora_A"][i]) / n_in + sum(row[i] for row in s["lora_B"]) / n_out)
            for i in range(len(s["lora_E"]))
        ]
    return out


def rounding_bound(dtype: Any) -> float:
    """How far the fused scores may be from the exact ones, relative: the sums are within about an ulp
    (float64 sums of float32 values; compensated float64 sums), then four roundings in the dtype.
    For float64 that is 1e-15, the issue's figure, with room to spare (4.4e-16)."""
    return 1e-15 if dtype == np.float64 else 4 * 2.0**-24 + 1e-12


def assert_scores_close_to_exact(scores: dict[str, np.ndarray], exact: dict[str, list[Fraction]], dtype: Any) -> None:
    tiny = 4 * float(np.finfo(dtype).smallest_subnormal)
    for name, values in exact.items():
        assert len(scores[name]) == len(values), name
        for i, (got, want) in enumerate(zip(scores[name].tolist(), values, strict=True)):
            error = abs(Fraction(got) - want)
            assert error <= rounding_bound(dtype) * want + Fraction(tiny), f"{name}[{i}]: {got} vs {float(want)}"


def assert_same_state(fused: RankAllocator, readable: RankAllocator) -> None:
    assert fused.state.keys() == readable.state.keys()
    for name, parts in readable.state.items():
        for part, state in parts.items():
            for quantity in QUANTITIES:
                ours, theirs = getattr(fused.state[name][part], quantity), getattr(state, quantity)
                assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs), f"{name}.{part}.{quantity}"
    assert fused.last_step == readable.last_step


def assert_same_masks(ours: Any, theirs: Any, rtol: float) -> None:
    """The same rows kept and pruned, but for rows whose score is within rounding (`rtol`) of the
    threshold, where sums in another order may fall on the other side; the thresholds within rounding."""
    assert math.isclose(ours.threshold, theirs.threshold, rel_tol=rtol)
    for name, keep in theirs.rank_pattern.items():
        for i, (kept, score) in enumerate(zip(keep, theirs.scores[name].tolist(), strict=True)):
            if not math.isclose(score, theirs.threshold, rel_tol=rtol):
                assert ours.rank_pattern[name][i] == kept, f"{name}[{i}]"
                assert np.array_equal(ours.lora_E[name][i], theirs.lora_E[name][i]), f"{name}[{i}]"


def grads_like(t: SVDTriplet) -> TripletGrads:
    """Gradients equal to the parameters."""
    return TripletGrads(t.lora_A, t.lora_E, t.lora_B)


def run_both(
    params: dict, grads: dict, layers: dict[str, int], steps: range, beta1: float = 0.85, beta2: float = 0.85
) -> Iterator[tuple[Any, Any, RankAllocator, RankAllocator]]:
    """Both allocators through the same masking steps: (readable allocation or error, fused's, ...)."""
    readable = RankAllocator(layers, beta1=beta1, beta2=beta2, **SCHEDULE)
    fused = FusedRankAllocator(layers, beta1=beta1, beta2=beta2, **SCHEDULE)
    for step in steps:
        outcomes = []
        for allocator in (readable, fused):
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    outcomes.append(allocator.update_and_allocate(params[step], grads[step], step))
            except ValueError as err:
                outcomes.append(err)
        yield outcomes[0], outcomes[1], readable, fused


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
def test_fused_averages_are_bitwise_the_readable_ones_and_the_scores_agree(dtype: Any) -> None:
    rng = np.random.default_rng(17)
    ranks = {name: r for name, (r, _, _) in LAYERS.items()}
    steps = range(1, 5)
    params = {s: {n: SVDTriplet(*t) for n, t in draw_triplets(rng, LAYERS, dtype, 0.5).items()} for s in steps}
    grads = {s: {n: TripletGrads(*t) for n, t in draw_triplets(rng, LAYERS, dtype, 1e-2).items()} for s in steps}
    for theirs, ours, readable, fused in run_both(params, grads, ranks, steps, beta1=0.7, beta2=0.9):
        assert_same_state(fused, readable)
        assert_scores_close_to_exact(ours.scores, exact_scores(fused), dtype)
        for name, (_, n_in, n_out) in LAYERS.items():
            assert ours.scores[name].dtype == dtype
            width = max(n_in, n_out) + 4  # the readable path's BLAS sums round up to that many times
            np.testing.assert_allclose(ours.scores[name], theirs.scores[name], rtol=width * np.finfo(dtype).eps)
        assert_same_masks(ours, theirs, rtol=(3072 + 4) * float(np.finfo(dtype).eps))
        assert ours.rank_pattern == theirs.rank_pattern  # no score of these draws is that close to the threshold


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def allocator_steps(draw: st.DrawFn) -> dict[str, Any]:
    """A few layers of small shapes (r = 0 and one feature included) and their values over 1 to 3 steps,
    floats of any finite magnitude the dtype holds: products that overflow are part of the draw."""
    dtype = draw(st.sampled_from(DTYPES))
    width = 32 if dtype == np.float32 else 64
    layers = draw(
        st.dictionaries(
            st.sampled_from(["a", "b", "c"]),
            st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(1, 4)),
            min_size=1,
            max_size=3,
        )
    )
    magnitude = draw(st.sampled_from([1.0, 2.0**10, 2.0**50, None]))  # None: anything finite
    element = st.floats(allow_nan=False, allow_infinity=False, width=width)
    if magnitude is not None:
        element = st.floats(-magnitude, magnitude, width=width)
    n_steps = draw(st.integers(1, 3))

    def tensors() -> dict[str, list[np.ndarray]]:
        return {
            name: [
                np.array(draw(st.lists(element, min_size=math.prod(s), max_size=math.prod(s))), dtype).reshape(s)
                for s in ((r, n_in), (r, 1), (n_out, r))
            ]
            for name, (r, n_in, n_out) in layers.items()
        }

    steps = range(1, n_steps + 1)
    return {
        "dtype": dtype,
        "ranks": {name: r for name, (r, _, _) in layers.items()},
        "params": {s: {n: SVDTriplet(*t) for n, t in tensors().items()} for s in steps},
        "grads": {s: {n: TripletGrads(*t) for n, t in tensors().items()} for s in steps},
        "steps": steps,
        "betas": draw(st.sampled_from([(0.85, 0.85), (0.5, 0.999), (1e-3, 0.3)])),
    }


@FUZZ
@given(allocator_steps())
def test_fuzz_fused_step_equals_the_readable_step(case: dict[str, Any]) -> None:
    """Each step: both refuse with the same message, or both accept with bitwise equal averages, equal
    masks and scores within a few ulps of exact. A refused step leaves both states as they were."""
    beta1, beta2 = case["betas"]
    for theirs, ours, readable, fused in run_both(
        case["params"], case["grads"], case["ranks"], case["steps"], beta1, beta2
    ):
        assert type(ours) is type(theirs)
        assert_same_state(fused, readable)
        if isinstance(ours, ValueError):
            assert str(ours) == str(theirs)
            continue
        assert_scores_close_to_exact(ours.scores, exact_scores(fused), case["dtype"])
        assert_same_masks(ours, theirs, rtol=8 * float(np.finfo(case["dtype"]).eps))


def test_scores_called_twice_or_after_a_refused_step_are_those_of_the_state() -> None:
    """scores() hands out the loop's scores once; later, or once the state was put back, it computes
    them from the state, with the same sums."""
    rng = np.random.default_rng(3)
    layers = {"l": (3, 5, 6)}
    fused = FusedRankAllocator({"l": 3}, **SCHEDULE)
    triplet = SVDTriplet(*draw_triplets(rng, layers, np.float64, 1.0)["l"])
    fused.update_ipt({"l": triplet}, {"l": TripletGrads(*draw_triplets(rng, layers, np.float64, 1.0)["l"])})
    first, second = fused.scores(), fused.scores()
    assert first["l"] is not second["l"] and np.array_equal(first["l"], second["l"])


# -- the readable path's refusal tests, run again with the fused allocator in its place ---------------


@pytest.fixture
def fused_everywhere(monkeypatch: pytest.MonkeyPatch) -> list[FusedRankAllocator]:
    """RankAllocator replaced by FusedRankAllocator in the model and in the readable path's test
    modules; the list collects every fused allocator made, so a test can check that one was used."""
    made: list[FusedRankAllocator] = []

    class Recorded(FusedRankAllocator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    for module in (model_module, test_allocator, test_hostile_api, test_hostile_api_fuzz):
        monkeypatch.setattr(module, "RankAllocator", Recorded)
    return made


NUMPY = [Backend("numpy", get_backend("numpy"), name) for name in ("float64", "float32")]


@pytest.mark.parametrize("be", NUMPY, ids=lambda b: b.dtype_name)
@pytest.mark.parametrize(
    "test",
    [
        test_allocator.test_non_finite_refused_and_state_unchanged,
        test_allocator.test_k_zero_prunes_nothing,
        test_allocator.test_layer_with_r_zero,
        test_allocator.test_missing_extra_layers_and_wrong_shapes,
        test_allocator.test_step_going_backwards_is_refused,
        test_allocator.test_masking_before_any_importance_is_refused,
        test_allocator.test_mask_prunes_k_smallest_and_keeps_ranknum_free,
        test_allocator.test_ties_at_threshold_all_go,
        test_allocator.test_all_zero_scores_prune_everything,
    ],
    ids=lambda f: f.__name__,
)
def test_readable_allocator_tests_pass_on_the_fused_path(
    test: Callable[..., None], be: Backend, fused_everywhere: list[FusedRankAllocator]
) -> None:
    if test is test_allocator.test_non_finite_refused_and_state_unchanged:
        for where in ("param", "grad"):
            for bad in (np.nan, np.inf):
                test(be, where, bad)
    else:
        test(be)
    assert fused_everywhere, "the test made no allocator: it did not run the fused path"


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize(
    "test",
    [
        test_hostile_api.test_the_allocator_refuses_inconsistent_triplets,
        test_hostile_api.test_scores_that_overflow_are_refused_at_the_masking_step,
        test_hostile_api_fuzz.test_fuzz_rank_allocator_update_and_allocate,
        test_training_faults.test_a_non_finite_gradient_with_a_finite_loss_is_named,
        test_training_faults.test_a_step_the_allocator_refuses_undoes_the_optimizer_step,
    ],
    ids=lambda f: f.__name__,
)
def test_refusals_hold_on_the_fused_path(
    test: Callable[..., None],
    fused_everywhere: list[FusedRankAllocator],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NaN / Inf, inconsistent triplets and overflowing scores refused, and the refused step leaves no
    trace: the readable path's tests, the allocator made by the model or by the test fused."""
    if test is test_training_faults.test_a_non_finite_gradient_with_a_finite_loss_is_named:
        test(monkeypatch)
    else:
        test()
    assert fused_everywhere and all(isinstance(a, FusedRankAllocator) for a in fused_everywhere)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize(("where", "value"), [("x", np.nan), ("x", 1e300), ("target", np.nan)])
def test_a_bad_batch_leaves_no_trace_on_the_fused_path(
    where: str, value: float, fused_everywhere: list[FusedRankAllocator]
) -> None:
    named = {
        ("x", np.nan): "the batch's x holds NaN or Inf",
        ("x", 1e300): "the loss is inf (the batch is finite)",
        ("target", np.nan): "the batch's target holds NaN or Inf",
    }[(where, value)]
    test_training_faults.test_a_bad_batch_is_refused_and_training_goes_on_as_if_it_never_came(
        where, value, named, "none"
    )
    assert fused_everywhere


def test_a_refused_masking_step_puts_the_previous_arrays_back_untouched() -> None:
    """The fused step writes into the other pair of arrays: the state it started from is intact when
    masking refuses the step, and the next step is the same as on an allocator that never saw it."""
    shapes = ((2, 3), (2, 1), (4, 2))
    small = SVDTriplet(*(np.full(s, 1.0, np.float32) for s in shapes))
    big = SVDTriplet(*(np.full(s, 1e10, np.float32) for s in shapes))
    fused, twin = (FusedRankAllocator({"fc": 2}, **SCHEDULE) for _ in range(2))
    for allocator in (fused, twin):
        allocator.update_and_allocate({"fc": small}, {"fc": grads_like(small)}, 1)
    arrays = {part: fused.state["fc"][part].exp_avg_ipt for part in PARTS}
    before = copy.deepcopy(fused.state)
    with pytest.raises(ValueError, match=r"the importance scores of \['fc'\] overflow"):
        fused.update_and_allocate({"fc": big}, {"fc": grads_like(big)}, 2)
    assert all(fused.state["fc"][part].exp_avg_ipt is arrays[part] for part in PARTS)
    for part in PARTS:
        for quantity in QUANTITIES:
            assert np.array_equal(getattr(fused.state["fc"][part], quantity), getattr(before["fc"][part], quantity))
    for allocator in (fused, twin):
        allocator.update_and_allocate({"fc": small}, {"fc": grads_like(small)}, 3)
    assert_same_state(fused, twin)


def test_the_fused_step_alternates_between_two_sets_of_arrays() -> None:
    """Nothing written in place: a step's ipt and averages go to the other set, which the next step
    reuses; so the state of one step keeps its values through the next one (as fused.py says)."""
    fused = FusedRankAllocator({"l1": 2, "l2": 2}, beta1=0.5, beta2=0.5, **SCHEDULE)
    params = test_allocator.params(NUMPY[0])
    grads = {n: TripletGrads(*(t * 0.5 for t in (tr.lora_A, tr.lora_E, tr.lora_B))) for n, tr in params.items()}
    seen = []
    for _ in range(3):
        fused.update_ipt(params, grads)
        seen.append(fused.state["l1"]["lora_B"])
        if len(seen) == 2:  # one step later, the first step's arrays still hold its values
            np.testing.assert_array_equal(seen[0].exp_avg_ipt, np.full((3, 2), 0.25))
    for field in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        arrays = [getattr(state, field) for state in seen]
        assert arrays[0] is not arrays[1] and arrays[2] is arrays[0], field
    np.testing.assert_array_equal(seen[2].exp_avg_ipt, np.full((3, 2), 0.4375))  # 0.5-averages of 0.5: 0.25, 0.375


# -- what the fused path refuses itself ----------------------------------------------------------------


def test_arrays_of_another_library_are_refused_saying_the_path_is_numpy_only() -> None:
    xp = pytest.importorskip("array_api_strict")
    fused = FusedRankAllocator({"l": 1}, **SCHEDULE)
    ones = [xp.ones(shape, dtype=xp.float64) for shape in ((1, 2), (1, 1), (2, 1))]
    with pytest.raises(FusedPathError, match=r"l\.lora_A is a array_api_strict.*NumPy-only.*use RankAllocator"):
        fused.update_ipt({"l": SVDTriplet(*ones)}, {"l": TripletGrads(*ones)})
    assert fused.state == {}


def test_a_state_of_the_wrong_shape_is_refused_before_any_loop_runs() -> None:
    fused = FusedRankAllocator({"l": 1}, **SCHEDULE)
    triplet = SVDTriplet(np.ones((1, 2)), np.ones((1, 1)), np.ones((2, 1)))
    fused.update_ipt({"l": triplet}, {"l": grads_like(triplet)})
    wider = SVDTriplet(np.ones((1, 5)), np.ones((1, 1)), np.ones((2, 1)))
    with pytest.raises(
        FusedPathError, match=r"exp_avg_ipt of l\.lora_A is float64 \(1, 2\), the tensor float64 \(1, 5\)"
    ):
        fused.update_ipt({"l": wider}, {"l": grads_like(wider)})


def test_without_numba_the_fused_allocator_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "adalora_ref._fused_kernels", None)  # the import fails, as without numba
    monkeypatch.delattr(adalora_ref, "_fused_kernels")
    with pytest.raises(ImportError, match=r"FusedRankAllocator needs numba.*pip install 'adalora-ref\[fast\]'"):
        FusedRankAllocator({"l": 1}, **SCHEDULE)


# -- conformance and the benchmark ----------------------------------------------------------------------


def test_conform_passes_every_allocator_and_trajectory_case_with_the_fused_allocator(
    fused_everywhere: list[FusedRankAllocator],
) -> None:
    results = list(run_cases(bundled_cases_dir(), backend="numpy", kinds=["allocator", "trajectory"]))
    assert len(results) > 20
    assert [r.first_failure for r in results if not r.passed] == []
    assert len(fused_everywhere) >= len(results)  # every case's model ran on a fused allocator


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_the_benchmark_workload_gives_the_same_numbers_on_both_paths(dtype_name: str) -> None:
    setup = bench.make_setup("numpy", dtype_name, with_peft=False)
    readable = bench.allocator_workload(setup, bench.SIZES["small"])
    fused = bench.allocator_workload(setup, bench.SIZES["small"], fused=True)
    assert fused.name == "allocator step (fused), 12 triplets" and fused.bytes_moved == readable.bytes_moved
    for _ in range(3):
        readable.ours.run()
        fused.ours.run()
    ours, theirs = fused.ours.outputs(), readable.ours.outputs()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert np.array_equal(ours[key], value), key


def test_the_fused_step_holds_no_more_memory_from_step_to_step() -> None:
    setup = bench.make_setup("numpy", "float32", with_peft=False)
    workload = bench.allocator_workload(setup, bench.SIZES["small"], fused=True)
    growth = bench_measure.memory_growth(setup, workload.ours, workload.name, 40)
    assert growth is not None and not growth.grows, growth


def test_views_read_only_arrays_and_mixed_dtypes_give_the_readable_averages() -> None:
    """A transposed or strided view, a read-only gradient and layers of both dtypes in one allocator."""
    rng = np.random.default_rng(5)
    layers = {"f32": 2, "f64": 3}
    readable, fused = RankAllocator(layers, **SCHEDULE), FusedRankAllocator(layers, **SCHEDULE)
    for step in (1, 2, 3):
        A32 = rng.normal(size=(4, 2)).astype(np.float32).T  # (2, 4), not C-contiguous
        E64, B64 = rng.normal(size=(3, 2))[:, :1], rng.normal(size=(6, 3))  # E: a strided column
        grads64 = [rng.normal(size=s) for s in ((3, 5), (3, 1), (6, 3))]
        for g in grads64:
            g.flags.writeable = False
        params = {
            "f32": SVDTriplet(A32, *(rng.normal(size=s).astype(np.float32) for s in ((2, 1), (3, 2)))),
            "f64": SVDTriplet(rng.normal(size=(3, 5)), E64, B64),
        }
        grads = {
            "f32": TripletGrads(*(rng.normal(size=s).astype(np.float32) for s in ((2, 4), (2, 1), (3, 2)))),
            "f64": TripletGrads(*grads64),
        }
        theirs = readable.update_and_allocate(params, grads, step)
        ours = fused.update_and_allocate(params, grads, step)
        assert_same_state(fused, readable)
        assert_same_masks(ours, theirs, rtol=8 * float(np.finfo(np.float32).eps))


# -- selecting the fused path: AdaLoraModel(fused=True) and `adalora-ref train --fused` ---------------


def test_the_model_builds_a_fused_allocator_only_when_asked() -> None:
    rng = np.random.default_rng(0)
    layers = {"fc1": model_module.BaseLinear(rng.normal(size=(5, 4)), np.zeros(5))}
    config = adalora_ref.AdaLoraConfig(target_modules=["fc1"], init_r=3, target_r=1, total_step=20)
    assert type(model_module.AdaLoraModel(layers, config).allocator) is RankAllocator
    assert type(model_module.AdaLoraModel(layers, config, fused=True).allocator) is FusedRankAllocator
    with pytest.raises(TypeError, match="fused must be True or False, got 'yes'"):
        model_module.AdaLoraModel(layers, config, fused="yes")  # type: ignore[arg-type]


def test_train_with_the_fused_step_prints_what_the_readable_one_does(capsys: pytest.CaptureFixture[str]) -> None:
    from adalora_ref.cli import main

    outputs = []
    for extra in ([], ["--fused"]):
        assert main(["train", "--steps", "60", *extra]) == 0
        outputs.append(capsys.readouterr().out.splitlines())
    readable, fused = outputs
    assert readable[0].endswith("the readable allocator") and fused[0].endswith("the fused allocator step")
    assert len(readable) > 5 and readable[1:] == fused[1:]  # losses, budgets, ranks and the pattern


def test_train_refuses_the_fused_step_on_another_backend(capsys: pytest.CaptureFixture[str]) -> None:
    from adalora_ref.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--fused", "--backend", "array_api_strict"])
    assert stop.value.code == 2
    assert "--fused runs on NumPy arrays only, not --backend array_api_strict" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("budget", [0, 3, 7, 11])
def test_fused_masking_decides_what_the_readable_masking_does(dtype: Any, budget: int) -> None:
    """mask_to_budget of the fused path (NumPy, its own loop) against the readable one on the same
    averages, ties included (a repeated score): threshold, rank pattern, masked E bitwise."""
    rng = np.random.default_rng(7)
    ranks = {"a": 4, "b": 3, "c": 0, "d": 4}
    params = {
        name: SVDTriplet(*(rng.normal(size=shape).astype(dtype) for shape in ((r, 5), (r, 1), (6, r))))
        for name, r in ranks.items()
    }
    grads = {
        name: TripletGrads(*(np.abs(x) * 0.1 for x in (t.lora_A, t.lora_E, t.lora_B))) for name, t in params.items()
    }
    readable, fused = RankAllocator(ranks, **SCHEDULE), FusedRankAllocator(ranks, **SCHEDULE)
    readable.update_ipt(params, grads)
    fused.update_ipt(params, grads)
    params["d"] = SVDTriplet(params["a"].lora_A, params["a"].lora_E, params["a"].lora_B)  # d ties a, row for row
    grads["d"] = grads["a"]
    readable.update_ipt(params, grads)
    fused.update_ipt(params, grads)
    expected, got = readable.mask_to_budget(params, budget), fused.mask_to_budget(params, budget)
    assert got.threshold == pytest.approx(expected.threshold, rel=1e-6)
    assert got.rank_pattern == expected.rank_pattern
    for name in ranks:
        np.testing.assert_array_equal(got.lora_E[name], expected.lora_E[name])
        assert got.lora_E[name].dtype == expected.lora_E[name].dtype
