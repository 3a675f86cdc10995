"""The cases of suite 1.1 (and 1.2) localise what the first suite saw only late or not at all: each wrong port
below passes every case of suite 1.0 up to a late, vague symptom (a rank pattern at step 21, a loss
at step 2) and is now caught by a 1.1 case at the first check its mistake changes, with the
quantity named. Also: the cases that start at step 0 say so, and the localised trajectories check
what SPEC 14.7 says they do, where it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adalora_ref import allocator as allocator_module
from adalora_ref import model as model_module
from adalora_ref import optim as optim_module
from adalora_ref import training as training_module
from adalora_ref.allocator import RankAllocator
from adalora_ref.conformance import reference
from adalora_ref.conformance.case import read_case
from adalora_ref.layer import SVDLinear

from .test_conformance import ALL_IDS, CASES, assert_caught_first, first_divergence


def warm_up_ends_early(step, *, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    """peft's schedule with `step < tinit` for its warm-up test (peft: `step <= tinit`)."""
    if step < tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % deltaT == 0


class ImportanceBeforeTheOptimizer:
    """Importance from the parameters as they were before the optimizer step (peft: after it)."""

    def __init__(self) -> None:
        self.before: dict = {}
        self.real_step = training_module._optimizer_step
        self.real_update_ipt = RankAllocator.update_ipt

    def optimizer_step(self, model, grads, optimizer) -> None:
        self.before = model.triplets()  # the arrays are replaced, never changed in place
        self.real_step(model, grads, optimizer)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        wrong = self

        def update_ipt(allocator, params, grads, **options):
            wrong.real_update_ipt(allocator, wrong.before or params, grads, **options)

        monkeypatch.setattr(training_module, "_optimizer_step", self.optimizer_step)
        monkeypatch.setattr(RankAllocator, "update_ipt", update_ipt)


class AdamWithoutDecay(optim_module.AdamW):
    """torch's Adam where AdamW was asked for: no decoupled weight decay."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_decay = 0.0


class AdamWithDefaultsOnly(optim_module.AdamW):
    """AdamW built from the learning rate alone: the case's betas, eps and weight_decay ignored."""

    def __init__(self, lr: float = 1e-3, **ignored) -> None:
        super().__init__(lr)


class AdamWithLrOrDefault(optim_module.AdamW):
    """`lr = lr or 1e-3`: a learning rate of 0 read as 'not given' (a falsy-zero bug)."""

    def __init__(self, lr: float = 1e-3, **options) -> None:
        super().__init__(lr or 1e-3, **options)


real_orthogonal_regularizer = model_module.orthogonal_regularizer


def orth_summed_not_averaged(triplets, orth_reg_weight):
    """R summed over the matrices instead of averaged over them."""
    n_matrices = 2 * len(triplets)
    value, grads = real_orthogonal_regularizer(triplets, orth_reg_weight)
    return value * n_matrices, [(g_A * n_matrices, g_B * n_matrices) for g_A, g_B in grads]


real_train_step = reference.train_step


def train_without_dropout(*args, dropout_masks=None, **kwargs):
    """Training that never applies the adapters' dropout masks."""
    return real_train_step(*args, **kwargs)


real_merge = SVDLinear.merge


def merge_never_refusing(layer, safe_merge=False, adapter_names=None):
    """merge(safe_merge=True) that writes the merged weight whatever it holds (peft: refuses a non-finite one)."""
    real_merge(layer, False, adapter_names)


def install_patch(patch, monkeypatch: pytest.MonkeyPatch) -> None:
    if isinstance(patch, tuple):
        monkeypatch.setattr(*patch)
    else:
        patch().install(monkeypatch)


WRONG_PORTS = [
    # (the mistake, the patch, the 1.1 case that catches it, the first divergence it must name)
    (
        "importance from the parameters before the optimizer step",
        ImportanceBeforeTheOptimizer,
        "trajectory/localised_mlp_mse_64",
        "ipt of fc1.lora_A at step 6 differs",
    ),
    (
        "AdamW without weight decay",
        (reference, "AdamW", AdamWithoutDecay),
        "trajectory/localised_mlp_mse_64",
        "lora_A after the optimizer step of fc1 at step 1 differs",
    ),
    (
        "orthogonal term summed over the matrices",
        (model_module, "orthogonal_regularizer", orth_summed_not_averaged),
        "trajectory/localised_mlp_mse_64",
        "orthogonal term (orth_reg_weight * R) at step 1 differs",
    ),
    (
        "dropout masks not applied",
        (reference, "train_step", train_without_dropout),
        "trajectory/dropout_64",
        "lora_E after the optimizer step of fc1 at step 1 differs",  # E = 0 at step 1: the loss agrees
    ),
    (
        "warm-up ends one step early (step < tinit)",
        (allocator_module, "budget_schedule", warm_up_ends_early),
        "allocator/from_step_0_64",
        "masking flag at step 0 is true, expected false",
    ),
    (
        "warm-up ends one step early, in training",
        (allocator_module, "budget_schedule", warm_up_ends_early),
        "trajectory/from_step_0_64",
        "rank pattern at step 0",
    ),
    (
        "safe merge writes a non-finite weight instead of refusing",
        (SVDLinear, "merge", merge_never_refusing),
        "layer/safe_merge_refused_64",
        "safe merge refused is false, expected true",
    ),
    (
        "safe merge writes a non-finite kernel instead of refusing",
        (SVDLinear, "merge", merge_never_refusing),  # SVDConv2d merges through its SVDLinear
        "conv_layer/safe_merge_refused_32",
        "safe merge refused is false, expected true",
    ),
    # suite 1.2
    (
        "AdamW with torch's defaults instead of the case's betas, eps and weight_decay",
        (reference, "AdamW", AdamWithDefaultsOnly),
        "trajectory/adamw_edges_64",
        "lora_A after the optimizer step of fc1 at step 1 differs",
    ),
    (
        "a learning rate of 0 read as 'not given'",
        (reference, "AdamW", AdamWithLrOrDefault),
        "trajectory/adamw_lr_zero_64",
        "non-zero rows of lora_E of fc1 at step 1 differs",  # E stays 0 under lr 0: it moved
    ),
]


@pytest.mark.parametrize(("mistake", "patch", "case_id", "named"), WRONG_PORTS, ids=[w[0] for w in WRONG_PORTS])
def test_wrong_port_is_caught_where_its_mistake_first_shows(
    mistake: str,
    patch,
    case_id: str,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert_caught_first(
        mistake, lambda: install_patch(patch, monkeypatch), case_id, named, tmp_path, monkeypatch, capsys
    )


@pytest.mark.parametrize("case_id", ["allocator/from_step_0_64", "trajectory/from_step_0_64"])
def test_cases_from_step_0_say_so_and_check_step_0(case_id: str) -> None:
    case = read_case(CASES, case_id)
    assert case.config["first_step"] == 0
    steps = sorted({c.step for c in case.checks if c.step is not None})
    assert steps == list(range(case.config["n_steps"]))
    assert f"step0.{'x' if case.kind == 'trajectory' else 'a.lora_A'}" in case.inputs
    # tinit 0: step 0 is the whole warm-up (the initial budget, no masking), step 1 already budgets
    assert case.expected["step0.budget"] > case.expected["step1.budget"]


def test_cases_without_first_step_start_at_1() -> None:
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        steps = [c.step for c in case.checks if c.step is not None]
        if case.kind in ("allocator", "trajectory") and "first_step" not in case.config:
            assert min(steps) == 1, case_id


LOCALISED = [
    i for i in ALL_IDS if i.startswith("trajectory/") and "after_optimizer_steps" in read_case(CASES, i).config
]


def test_the_localising_trajectories() -> None:
    assert LOCALISED == [
        "trajectory/adamw_edges_64",
        "trajectory/dropout_64",
        "trajectory/fan_in_fan_out_64",
        "trajectory/from_step_0_64",
        "trajectory/localised_mlp_mse_64",
        "trajectory/orth_zero_64",
    ]


@pytest.mark.parametrize("case_id", LOCALISED)
def test_a_localising_trajectory_checks_each_quantity_where_spec_says(case_id: str) -> None:
    """Per step: task loss, orthogonal term, loss first; the parameters after the optimizer step at the
    phase boundaries; at every masking step the importance (before the final one), scores, threshold."""
    case = read_case(CASES, case_id)
    c, a = case.config, case.config["adalora"]
    first, final = c.get("first_step", 1), a["total_step"] - a["tfinal"]
    last = first + c["n_steps"] - 1
    assert c["after_optimizer_steps"] == sorted(
        {first, a["tinit"], a["tinit"] + 1, final, final + 1, a["total_step"], last}
    )
    layers = [name for name, *_, targeted in c["layers"] if targeted]
    masking = sorted(int(label.split()[1]) for label in case.margins)
    assert masking and masking[-1] == final and all(m > a["tinit"] for m in masking)
    keys = [check.key for check in case.checks]
    for step in range(first, last + 1):
        at = [k.split(".", 1)[1] for k in keys if k.startswith(f"step{step}.")]
        assert at[:3] == ["task_loss", "orth_loss", "loss"], (case_id, step)
        after = {k for k in at if k.startswith("after_optimizer.")}
        assert bool(after) == (step in c["after_optimizer_steps"])
        if after:
            assert {f"after_optimizer.{n}.{p}" for n in layers for p in ("lora_A", "lora_E", "lora_B")} <= after
        importance = {k for k in at if k.split(".")[0] in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
        assert len(importance) == (9 * len(layers) if step in masking and step < final else 0), (case_id, step)
        scored = {k for k in at if k.split(".")[0] in ("scores", "threshold")}
        assert len(scored) == (len(layers) + 1 if step in masking else 0), (case_id, step)
    if a.get("orth_reg_weight") == 0.0:
        assert all(not np.any(case.expected[k]) for k in keys if k.endswith(".orth_loss"))


def test_an_empty_initial_triplet_written_as_json_lists_is_caught(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """init/r_zero (suite 1.2): a port that writes its empty triplet as JSON `[]` (shape (0,)) is told
    the shape it should have, for each of the three tensors."""
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "r_zero.json").write_text('{"values": {"lora_A": [], "lora_E": [], "lora_B": []}}')
    message = first_divergence(tmp_path, "init/r_zero", capsys)
    hint = '(a JSON [] is shape (0,): write {"shape": [0, 6], "data": []})'
    assert message == f"initial lora_A (empty) has shape (0,), expected (0, 6) {hint}"
