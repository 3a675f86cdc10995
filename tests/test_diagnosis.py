"""The runner's diagnosis: every failing quantity of a case in computation order, consequences marked,
known port mistakes named (docs/SPEC.md sections 16 and 18), readable differences, strict JSON types.

Each wrong port is the reference with one mistake patched in (the nine of tests/test_conformance.py
and five more), its outputs computed on every bundled case and judged: its own mistake must be
named, and no other. The correct ports (the reference; the golden expected values written as a
port) must name none."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adalora_ref import allocator as allocator_module
from adalora_ref import model as model_module
from adalora_ref import orth as orth_module
from adalora_ref._backend import get_backend
from adalora_ref.cli import main
from adalora_ref.conformance import reference
from adalora_ref.conformance.case import Case, Check, read_case
from adalora_ref.conformance.compare import compare, judge
from adalora_ref.conformance.mistakes import MISTAKES
from adalora_ref.conformance.port import write_port_outputs
from adalora_ref.conformance.reference import run_case
from adalora_ref.conformance.report import diagnosis_text
from adalora_ref.conformance.results import CaseResult
from adalora_ref.optim import AdamW
from tests.test_conformance import ALL_IDS, CASES, WRONG_PORTS

XP = get_backend("numpy")
Patch = tuple[Any, str, Any]


# --- four more wrong ports (the mistakes of the two real ports the issue measured) ----------------


def orth_over_layers(triplets, orth_reg_weight):
    """R divided by the number of layers instead of the number of matrices: twice peft's."""
    value, grads = orth_module.orthogonal_regularizer(triplets, orth_reg_weight)
    return 2 * value, [(2 * g_A, 2 * g_B) for g_A, g_B in grads]


def no_final_masking(params, rank_pattern):
    """The final phase leaves E as the optimizer left it."""
    return {name: triplet.lora_E for name, triplet in params.items()}


def e_never_zeroed(self, lora_E, adapter_name=None):
    """MindSpore's masked_fill is out of place: the masked E is computed and dropped."""


real_update_importance = allocator_module.update_importance


def betas_as_float32(state, ipt, beta1, beta2):
    """beta1 = 0.85 rounded to float32 by the framework before it meets a float64 array."""
    real_update_importance(state, ipt, float(np.float32(beta1)), float(np.float32(beta2)))


real_update_and_allocate = model_module.AdaLoraModel.update_and_allocate


def steps_from_0(self, global_step, *args, **kwargs):
    """A 0-based loop counter passed as the step: every call one less than peft's."""
    return real_update_and_allocate(self, max(global_step - 1, 0), *args, **kwargs)


class AdamWFloat32Lr(AdamW):
    def __init__(self, lr: float, **kwargs: Any) -> None:
        super().__init__(lr=float(np.float32(lr)), **kwargs)


# (the mistake's name in mistakes.py, its patches, the case it is pinned on, the quantity named first)
PORTS: list[tuple[str, list[Patch], str, str]] = [
    (name, [patch], case_id, quantity)
    for (_, patch, case_id, _), (name, quantity) in zip(
        WRONG_PORTS,
        [
            ("linear budget schedule", "budget"),
            ("E initialized to ones", "initial lora_E"),
            ("score = ipt + unc", "triplet scores"),
            ("uncertainty against the previous average", "exp_avg_unc"),
            ("scaling = lora_alpha / r", "scaling"),
            ("conv patches ordered (kh, kw, C)", "output y"),
            ("ranknum changed by masking", "ranknum"),
            ("importance from E alone", "ipt"),
            ("keep the top budget rows by count", "rank pattern"),
        ],
        strict=True,
    )
] + [
    (
        "orthogonal term averaged over layers instead of matrices",
        [
            (reference, "orthogonal_regularizer", orth_over_layers),
            (model_module, "orthogonal_regularizer", orth_over_layers),
        ],
        "orth/basic_f64",
        "regularizer value",
    ),
    (
        "no masking in the final phase",
        [(model_module, "mask_using_rank_pattern", no_final_masking)],
        "allocator/phases_64",
        "lora_E after update_and_allocate",
    ),
    (
        "E never zeroed by masking",
        [(model_module.AdaLoraModel, "set_lora_E", e_never_zeroed)],
        "allocator/phases_64",
        "lora_E after update_and_allocate",
    ),
    (
        "float32-rounded constants in a float64 case",
        [(allocator_module, "update_importance", betas_as_float32), (reference, "AdamW", AdamWFloat32Lr)],
        "allocator/phases_64",
        "exp_avg_ipt",
    ),
    (
        "steps counted from 0 (one step late)",
        [(model_module.AdaLoraModel, "update_and_allocate", steps_from_0)],
        "allocator/phases_64",
        "budget",
    ),
]


def port_outputs(patches: list[Patch], monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Case, dict[str, Any]]]:
    """(case, outputs) of the reference with `patches` applied, on every bundled case; the patches are
    undone before the caller judges (a recogniser may run the reference itself)."""
    computed = []
    for target, attribute, replacement in patches:
        monkeypatch.setattr(target, attribute, replacement)
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        computed.append((case, run_case(case, XP)))
    monkeypatch.undo()
    yield from computed


def judged(patches: list[Patch], monkeypatch: pytest.MonkeyPatch) -> dict[str, CaseResult]:
    return {case.id: compare(case, outputs) for case, outputs in port_outputs(patches, monkeypatch)}


def test_every_spec_mistake_has_a_wrong_port() -> None:
    assert sorted(name for name, *_ in PORTS) == sorted(m.name for m in MISTAKES)
    assert [m.spec for m in MISTAKES] == [f"18.{i}" for i in range(1, len(MISTAKES) + 1)]


@pytest.mark.parametrize(("name", "patches", "case_id", "root"), PORTS, ids=[p[0] for p in PORTS])
def test_wrong_port_is_named_and_nothing_else(
    name: str, patches: list[Patch], case_id: str, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = judged(patches, monkeypatch)
    pinned = results[case_id]
    assert pinned.quantities and pinned.quantities[0].quantity == root, diagnosis_text(pinned)
    assert [m.name for m in pinned.known_mistakes] == [name], diagnosis_text(pinned)
    spec = next(m.spec for m in MISTAKES if m.name == name)
    assert f"looks like: {name} (SPEC section {spec})" in diagnosis_text(pinned)
    others = {m.name for r in results.values() for m in r.known_mistakes} - {name}
    assert others == set(), f"{name} also looks like {others}"


def test_the_reference_names_no_mistake() -> None:
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        result = compare(case, run_case(case, XP))
        assert (result.failures, result.quantities, result.known_mistakes) == ([], [], []), case_id


def test_the_golden_values_as_a_port_pass_with_no_mistake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        write_port_outputs(tmp_path / "port", case, case.expected)
    report = tmp_path / "report.json"
    assert main(["conform", "--port", str(tmp_path / "port"), "--json", str(report)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{len(ALL_IDS)} passed, 0 failed")
    for r in json.loads(report.read_text())["results"]:
        assert (r["status"], r["failures"], r["quantities"], r["known_mistakes"]) == ("pass", [], [], []), r["case"]


# --- one run, several bugs: every quantity, every mistake ------------------------------------------


def test_one_run_lists_every_failing_quantity_of_several_bugs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    by_name = {name: patches for name, patches, _, _ in PORTS}
    bugs = [
        "uncertainty against the previous average",
        "keep the top budget rows by count",
        "ranknum changed by masking",
    ]
    for case, outputs in port_outputs([p for name in bugs for p in by_name[name]], monkeypatch):
        if case.kind in ("allocator", "trajectory"):
            write_port_outputs(tmp_path / "port", case, outputs)
    report = tmp_path / "report.json"
    kinds = ["--kind", "allocator", "--kind", "trajectory"]
    code = main(["conform", "--port", str(tmp_path / "port"), *kinds, "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    results = {r["case"]: r for r in json.loads(report.read_text())["results"]}
    ties = results["allocator/ties_64"]  # two independent bugs in one case: both roots listed, both named
    assert [q["quantity"] for q in ties["quantities"] if not q["follows_from"]] == ["exp_avg_unc", "rank pattern"]
    assert {m["name"] for m in ties["known_mistakes"]} == set(bugs[:2])
    assert results["trajectory/mlp_mse_64"]["quantities"][0]["quantity"] == "ranknum"
    named = {m["name"] for r in results.values() for m in r["known_mistakes"]}
    assert named == set(bugs)
    for r in results.values():  # every failing check is listed, and grouped once per quantity
        assert len(r["failures"]) == r["failed"] == sum(q["failed"] for q in r["quantities"])
        assert len({q["quantity"] for q in r["quantities"]}) == len(r["quantities"])
    assert "looks like: keep the top budget rows by count (SPEC section 18.9)" in out


def test_consequences_are_marked_and_ordered_by_the_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    patch = next(p for name, p, _, _ in PORTS if name == "uncertainty against the previous average")
    result = judged(patch, monkeypatch)["allocator/phases_64"]
    order = [q.quantity for q in result.quantities]
    assert order == ["exp_avg_unc", "triplet scores", "threshold"]
    assert [q.follows_from for q in result.quantities] == [[], ["exp_avg_unc"], ["exp_avg_unc"]]
    text = diagnosis_text(result)
    assert text.splitlines()[0] == f"first divergence: {result.failures[0].message}"
    assert "3 quantities diverge, in the order they are computed:" in text
    assert "probably follows from exp_avg_unc" in text


def test_an_independent_later_failure_is_not_marked_as_a_consequence() -> None:
    """A budget wrong from step 1 does not explain an ipt wrong at step 5: ipt is computed from inputs."""
    case = read_case(CASES, "allocator/phases_64")
    outputs = run_case(case, XP)
    outputs["step1.budget"] += 1
    outputs["step5.ipt.v.lora_B"] = outputs["step5.ipt.v.lora_B"] * 2
    result = compare(case, outputs)
    assert [(q.quantity, q.follows_from) for q in result.quantities][:2] == [("budget", []), ("ipt", [])]


# --- readable differences and strict types ---------------------------------------------------------


def exact(quantity: str = "rank pattern", layer: str | None = "dead", step: int | None = 1) -> Check:
    return Check(key="k", quantity=quantity, type="exact", step=step, layer=layer)


def message(check: Check, actual: Any, expected: Any, rtol: float = 1e-10) -> str | None:
    _, failure = judge(check, actual, expected, rtol)
    return None if failure is None else failure.message


def test_a_list_check_names_only_the_differing_indices() -> None:
    got = message(exact(), [False, False, True, True], [False, False, False, False])
    assert got == "rank pattern of dead at step 1 differs at indices [2, 3]: [true, true], expected [false, false]"
    assert message(exact(), [True, False], [True, False, True]) == (
        "rank pattern of dead at step 1 is [true, false], expected [true, false, true]"
    )


def test_a_dict_check_names_only_the_differing_fields() -> None:
    check = exact("saved adapter_config fields", layer=None, step=None)
    expected = {"init_r": 12, "lora_alpha": 32, "target_modules": ["q", "v"], "bias": "none", "rank_pattern": None}
    actual = {**expected, "lora_alpha": 32.0, "target_modules": ["v", "q"], "extra": 1}
    del actual["bias"]
    assert message(check, actual, expected) == (
        "saved adapter_config fields differs in lora_alpha: 32.0 (a float), expected the integer 32; "
        'target_modules[0]: "v", expected "q"; target_modules[1]: "q", expected "v"; bias: absent, expected "none"; '
        "extra: 1, not expected (no such field)"
    )
    pattern = {"fc1.lora_E": [True, True], "fc3.lora_E": [True, False]}
    got = message(exact(layer=None, step=6), {**pattern, "fc3.lora_E": [True, True]}, pattern)
    assert got == "rank pattern at step 6 differs in fc3.lora_E[1]: true, expected false"


@pytest.mark.parametrize(
    ("quantity", "actual", "expected", "text"),
    [
        ("budget", 16.0, 16, "budget at step 1 is 16.0 (a float), expected the integer 16"),
        ("budget", True, 1, "budget at step 1 is true (a boolean), expected the integer 1"),
        ("mask flag", 1, True, "mask flag at step 1 is 1 (an integer), expected the boolean true"),
        ("mask flag", 0, False, "mask flag at step 1 is 0 (an integer), expected the boolean false"),
        ("ranknum", True, 4.0, "ranknum at step 1 is true (a boolean), expected the float 4.0"),
        ("ranknum", 4, 4.0, None),  # an integer where a float is expected: same number
        ("scaling", 8.0, 8, None),  # scaling is a real number (peft keeps lora_alpha's Python type)
        ("scaling", np.float64(8.0), 8, None),
        ("budget", np.int64(16), 16, None),  # numpy scalars are their Python values
        ("mask flag", np.bool_(True), True, None),
    ],
)
def test_exact_checks_respect_json_types(quantity: str, actual: Any, expected: Any, text: str | None) -> None:
    assert message(exact(quantity, layer=None), actual, expected) == text


def test_integers_for_booleans_in_a_list_are_named() -> None:
    assert message(exact(), [1, 0], [True, False]) == (
        "rank pattern of dead at step 1 differs at indices [0, 1]: [1, 0], expected [true, false] "
        "(integers where booleans are expected)"
    )


def test_an_exact_check_written_as_a_tensor_is_named() -> None:
    got = message(exact("budget", layer=None), np.array([16.0]), 16)
    assert got is not None and "was written as a tensor of shape (1,)" in got and "SPEC section 15" in got


def tensor(quantity: str = "ipt") -> Check:
    return Check(key="k", quantity=quantity, type="tensor", step=1, layer="q.lora_A")


def test_an_error_against_zeros_is_absolute() -> None:
    got = message(tensor(), np.array([[0.0733, 0.0]]), np.zeros((1, 2)))
    assert (
        got == "ipt of q.lora_A at step 1 differs by 0.0733 absolute (expected all zeros; at index (0, 0): 0.0733; "
        "tolerance 1e-10)"
    )


def test_nan_is_an_infinite_error_in_the_case_and_the_json(tmp_path: Path) -> None:
    case = read_case(CASES, "layer/basic_64")
    outputs = run_case(case, XP)
    outputs["y"] = outputs["y"].copy()
    outputs["y"][2, 3] = math.nan
    result = compare(case, outputs)
    assert result.max_error == math.inf and not result.passed
    assert result.failures[0].message.startswith("output y is not finite (at index (2, 3): nan, expected ")
    report = result.to_json()
    assert report["max_error"] == "inf" and report["failures"][0]["error"] == "inf"
    json.loads(json.dumps(report, allow_nan=False))  # strict JSON: no Infinity


def test_the_json_failure_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    patch = next(p for name, p, _, _ in PORTS if name == "keep the top budget rows by count")
    result = judged(patch, monkeypatch)["allocator/ties_64"].to_json()
    first = result["failures"][0]
    assert set(first) == {"key", "quantity", "step", "layer", "message", "error"}
    assert (first["key"], first["quantity"], first["step"], first["layer"], first["error"]) == (
        "step1.rank_pattern.dead",
        "rank pattern",
        1,
        "dead",
        None,
    )
    assert first["message"] == result["first_failure"]
    assert result["known_mistakes"] == [{"name": "keep the top budget rows by count", "spec": "18.9"}]
    assert result["status"] == "fail"


def test_keep_limits_what_is_recorded_not_what_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    case = read_case(CASES, "allocator/phases_64")
    outputs = run_case(case, XP)
    for key in list(outputs)[:10]:
        outputs[key] = outputs[key] * 2 if isinstance(outputs[key], np.ndarray) else outputs[key]
    whole, kept = compare(case, outputs), compare(case, outputs, keep=1)
    assert kept.n_failed == whole.n_failed > 1 and len(kept.failures) == 1
    assert f"({whole.n_failed - 1} more failing checks not recorded)" in diagnosis_text(kept)


def test_malformed_outputs_are_judged_not_crashed_on() -> None:
    """Recognisers read the port's own outputs: odd types there fail their checks and match nothing."""
    case = read_case(CASES, "trajectory/mlp_mse_64")
    outputs = run_case(case, XP)
    outputs.update({"step6.rank_pattern": "fc3", "step6.budget": "17", "step6.ranknum.fc3": None, "step1.loss": "x"})
    result = compare(case, outputs)
    assert result.known_mistakes == [] and result.n_failed >= 4
    assert result.failures[0].message.startswith("loss at step 1")


def test_ranknum_set_to_the_loaded_rank_is_named_in_a_checkpoint_case() -> None:
    case = read_case(CASES, "checkpoint/trained_and_saved")
    outputs = run_case(case, XP)
    for name in ("fc1", "fc2", "fc3"):
        outputs[f"ranknum.{name}"] = float(outputs[f"r.{name}"])
    result = compare(case, outputs)
    assert [q.quantity for q in result.quantities] == ["ranknum after loading"]
    assert [m.name for m in result.known_mistakes] == ["ranknum changed by masking"]


@pytest.mark.filterwarnings("ignore:.*divide:RuntimeWarning")  # r = 0 layers divide 0 by 0 without the +1e-5
def test_a_missing_plus_1e5_is_not_taken_for_float32_rounding_where_it_can_be_told_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the +1e-5 of the denominator the layer and checkpoint cases fail by about 2.5e-6 / r:
    the size of float32 rounding, but those cases use no constant float32 cannot hold."""
    from adalora_ref import layer as layer_module

    results = judged([(layer_module, "RANKNUM_EPS", 0.0)], monkeypatch)
    failing = [r for r in results.values() if not r.passed and r.kind in ("layer", "conv_layer", "checkpoint")]
    assert len(failing) >= 14
    assert all(r.known_mistakes == [] for r in failing), [(r.case_id, r.known_mistakes) for r in failing]


def test_e_never_zeroed_is_judged_by_the_ports_own_pattern_only() -> None:
    """A port that writes no rank patterns and leaves pruned E rows alive (e.g. one that masks at
    other steps than peft's) is not called 18.10 on peft's pattern: the recogniser needs the port's own."""
    case = read_case(CASES, "allocator/phases_64")
    outputs = {key: value for key, value in case.expected.items() if ".rank_pattern." not in key}
    step = next(c.step for c in case.checks if c.quantity == "rank pattern")
    layer = next(c.layer for c in case.checks if c.quantity == "rank pattern" and False in case.expected[c.key])
    alive = np.array(outputs[f"step{step}.lora_E.{layer}"], copy=True)
    alive[alive == 0] = 0.5  # every pruned row alive again
    outputs[f"step{step}.lora_E.{layer}"] = alive
    result = compare(case, outputs)
    assert any(f.check.quantity == "lora_E after update_and_allocate" for f in result.failures)
    assert "E never zeroed by masking" not in [m.name for m in result.known_mistakes]
