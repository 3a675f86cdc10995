"""The golden cases: the reference passes all of them on every backend; the manifest catches
tampering; `adalora-ref conform` reports; and every mistake of the seed's port is caught, with
the right quantity named first."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from adalora_ref import allocator as allocator_module
from adalora_ref import conv as conv_module
from adalora_ref import model as model_module
from adalora_ref._backend import BACKENDS, get_backend
from adalora_ref.allocator import Allocation, ImportanceState, RankAllocator
from adalora_ref.cli import main
from adalora_ref.conformance import reference
from adalora_ref.conformance.case import MANIFEST, CaseError, bundled_cases_dir, case_ids, read_case, read_manifest
from adalora_ref.conformance.compare import compare
from adalora_ref.conformance.port import write_port_outputs
from adalora_ref.conformance.reference import run_case
from adalora_ref.conformance.runner import run_cases
from adalora_ref.layer import SVDLinear

CASES = bundled_cases_dir()
ALL_IDS = case_ids(CASES)


def test_bundled_cases_cover_every_kind_and_stay_small() -> None:
    manifest = read_manifest(CASES)
    assert {i.split("/")[0] for i in ALL_IDS} == {
        "layer",
        "conv_layer",
        "init",
        "orth",
        "schedule",
        "allocator",
        "trajectory",
        "checkpoint",
        "config",
        "targeting",
    }
    assert manifest["provenance"]["peft"] == "0.21.2" and manifest["provenance"]["torch"].startswith("2.13.0")
    assert sum(p.stat().st_size for p in CASES.rglob("*") if p.is_file()) < 20e6
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        assert case.provenance["peft"] == "0.21.2" and "seed" in case.provenance, case_id
        assert all(m >= (1e-8 if case.dtype == "float64" else 1e-3) for m in case.margins.values()), case_id


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_passes_every_case(backend: str) -> None:
    try:
        get_backend(backend)
    except ImportError as err:
        pytest.skip(f"backend {backend} unavailable: {err}")
    failures = [r.first_failure for r in run_cases(CASES, backend=backend) if not r.passed]
    assert failures == []


def test_float64_cases_pass_far_inside_their_tolerance() -> None:
    """float64: 1e-10 relative is the tolerance; the reference's largest error is orders smaller."""
    xp = get_backend("numpy")
    for case_id in ALL_IDS:
        case = read_case(CASES, case_id)
        if case.dtype == "float64" and case.kind != "init":
            assert compare(case, run_case(case, xp)).max_error < 1e-12, case_id


class TestManifest:
    @pytest.fixture
    def copy(self, tmp_path: Path) -> Path:
        return Path(shutil.copytree(CASES, tmp_path / "cases"))

    def test_changed_file_is_named(self, copy: Path) -> None:
        path = copy / "layer" / "basic_64.json"
        path.write_text(path.read_text().replace('"lora_alpha": 8', '"lora_alpha": 9'))
        with pytest.raises(CaseError, match=r"layer/basic_64.json: changed or truncated"):
            read_manifest(copy)

    def test_truncated_file_is_named(self, copy: Path) -> None:
        path = copy / "allocator" / "phases_64.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
        with pytest.raises(CaseError, match=r"allocator/phases_64.safetensors: changed or truncated"):
            read_manifest(copy)

    def test_missing_and_unlisted_files_are_named(self, copy: Path) -> None:
        (copy / "orth" / "basic_f64.json").unlink()
        with pytest.raises(CaseError, match=r"orth/basic_f64.json: listed in MANIFEST.json but missing"):
            read_manifest(copy)
        shutil.copy(CASES / "orth" / "basic_f64.json", copy / "orth" / "basic_f64.json")
        (copy / "orth" / "stray.json").write_text("{}")
        with pytest.raises(CaseError, match=r"orth/stray.json: not listed in MANIFEST.json"):
            read_manifest(copy)

    def test_conform_refuses_a_tampered_directory(self, copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
        (copy / MANIFEST).write_text("{}")
        assert main(["conform", "--cases", str(copy)]) == 2
        assert "format None" in capsys.readouterr().err


def test_conform_cli_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    assert main(["conform", "--kind", "layer", "--kind", "schedule", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "layer/basic_64" in out and "largest error" in out and out.strip().endswith("0 failed")
    data = json.loads(report.read_text())
    assert data["passed"] is True and len(data["results"]) == sum(
        i.split("/")[0] in ("layer", "schedule") for i in ALL_IDS
    )


def test_conform_cases_dir_with_a_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Anyone can add cases: a directory of cases with its own manifest."""
    from adalora_ref.conformance.case import write_case, write_manifest

    subset = tmp_path / "mine"
    case = read_case(CASES, "orth/basic_f64")
    write_case(subset, case)
    write_manifest(subset, {"by": "a test"})
    assert main(["conform", "--cases", str(subset)]) == 0
    assert "1 passed, 0 failed" in capsys.readouterr().out


# --- ports -------------------------------------------------------------------------------------


def dump_port(port_dir: Path, case_id: str) -> None:
    """A 'port' that is the reference itself, writing its outputs in the port format."""
    case = read_case(CASES, case_id)
    write_port_outputs(port_dir, case, run_case(case, get_backend("numpy")))


def first_divergence(port_dir: Path, case_id: str, capsys: pytest.CaptureFixture[str]) -> str:
    kind = case_id.split("/")[0]
    code = main(["conform", "--port", str(port_dir), "--kind", kind])
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith(case_id))
    assert line.rstrip().endswith("FAIL"), out
    assert code == 1
    after = out.splitlines()[out.splitlines().index(line) + 1]
    return after.split("first divergence: ", 1)[1]


def test_a_correct_port_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for case_id in ALL_IDS:
        if case_id.startswith(("schedule/", "allocator/")):
            dump_port(tmp_path, case_id)
    assert main(["conform", "--port", str(tmp_path), "--kind", "schedule", "--kind", "allocator"]) == 0
    assert " 0 failed" in capsys.readouterr().out


def test_missing_port_outputs_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conform", "--port", str(tmp_path), "--kind", "orth"]) == 1
    assert "no outputs for this case" in capsys.readouterr().out


# Each wrong port below makes one mistake of the seed's Elixir port (shared/seed/), then dumps
# its outputs; the runner must fail it and name the first quantity that diverges.


def linear_schedule(step, *, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    progress = (step - tinit) / (total_step - tfinal - tinit)
    return int(init_bgt - (init_bgt - target_bgt) * progress), step % deltaT == 0


def e_init_ones(rng, r, n_in, n_out, **kw):
    t = real_init_triplet(rng, r, n_in, n_out, **kw)
    return type(t)(t.lora_A, t.lora_A[:, :1] * 0 + 1, t.lora_B)


real_init_triplet = reference.init_triplet


def score_as_sum(state: ImportanceState):
    return state.exp_avg_ipt + state.exp_avg_unc


def unc_against_previous(state, ipt, beta1, beta2):
    previous = state.exp_avg_ipt
    state.ipt = ipt
    state.exp_avg_ipt = beta1 * previous + (1 - beta1) * ipt
    state.exp_avg_unc = beta2 * state.exp_avg_unc + (1 - beta2) * abs(ipt - previous)


class AlphaOverR(SVDLinear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for adapter in self.adapters.values():
            adapter.scaling = adapter.lora_alpha / adapter.triplet.r if adapter.triplet.r else 0.0


real_set_lora_E = model_module.AdaLoraModel.set_lora_E


def ranknum_follows_mask(self, lora_E):
    real_set_lora_E(self, lora_E)
    for name in lora_E:
        adapter = self.adapted[name].adapters[self.trainable_adapter_name]
        kept = float(np.count_nonzero(np.asarray(adapter.triplet.lora_E)))
        adapter.ranknum = adapter.ranknum * 0 + kept


real_update_ipt = RankAllocator.update_ipt


def importance_from_E_alone(self, params, grads, **options):
    real_update_ipt(self, params, grads, **options)
    for layer_state in self.state.values():
        for part in ("lora_A", "lora_B"):
            layer_state[part] = ImportanceState.zeros_like(layer_state[part].ipt)


real_mask_to_budget = RankAllocator.mask_to_budget


def keep_top_budget_by_count(self, params, budget):
    out: Allocation = real_mask_to_budget(self, params, budget)
    scores = np.concatenate([np.asarray(s) for s in out.scores.values()])
    k = self.init_bgt - budget
    order = np.argsort(scores, kind="stable")
    pruned = set(order[:k].tolist()) if k > 0 else set()
    offset = 0
    for name, s in out.scores.items():
        keep = [offset + i not in pruned for i in range(len(s))]
        offset += len(s)
        out.rank_pattern[name] = keep
        E = np.asarray(params[name].lora_E)
        out.lora_E[name] = np.where(np.asarray(keep)[:, None], E, 0.0)
    return out


real_im2col = conv_module.im2col


def im2col_taps_outer(x, kernel_size, *args):
    """Patch columns ordered (kh, kw, C) instead of torch's (C, kh, kw): A's columns meet the wrong pixels."""
    patches, out_hw = real_im2col(x, kernel_size, *args)
    n_rows, c = patches.shape[0], x.shape[1]
    taps = patches.shape[1] // c
    return np.reshape(np.swapaxes(np.reshape(patches, (n_rows, c, taps)), 1, 2), (n_rows, c * taps)), out_hw


WRONG_PORTS = [
    # (the mistake, what to patch, the case, the quantity that must be named first)
    (
        "linear budget schedule",
        (allocator_module, "budget_schedule", linear_schedule),
        "schedule/tinit_zero",
        "budget at step",
    ),
    ("E initialized to ones", (reference, "init_triplet", e_init_ones), "init/default", "initial lora_E"),
    (
        "score = ipt + unc",
        (allocator_module, "element_score", score_as_sum),
        "allocator/phases_64",
        "triplet scores of q at step 4",
    ),
    (
        "uncertainty against the previous average",
        (allocator_module, "update_importance", unc_against_previous),
        "allocator/phases_64",
        "exp_avg_unc of q.lora_A at step 1",
    ),
    ("scaling = lora_alpha / r", (reference, "SVDLinear", AlphaOverR), "layer/basic_64", "scaling is 2.0, expected 8"),
    (
        "conv patches ordered (kh, kw, C)",
        (conv_module, "im2col", im2col_taps_outer),
        "conv_layer/basic_64",
        "output y",
    ),
    (
        "ranknum changed by masking",
        (model_module.AdaLoraModel, "set_lora_E", ranknum_follows_mask),
        "trajectory/mlp_mse_64",
        "ranknum of fc3 at step 6 is 5.0, expected 6.0",
    ),
    (
        "importance from E alone",
        (RankAllocator, "update_ipt", importance_from_E_alone),
        "allocator/phases_64",
        "ipt of q.lora_A at step 1",
    ),
    (
        "keep the top budget by count (>= rule)",
        (RankAllocator, "mask_to_budget", keep_top_budget_by_count),
        "allocator/ties_64",
        "rank pattern of dead at step 1",
    ),
]


@pytest.mark.parametrize(("mistake", "patch", "case_id", "named"), WRONG_PORTS, ids=[w[0] for w in WRONG_PORTS])
def test_wrong_port_is_caught_at_the_right_quantity(
    mistake: str,
    patch: tuple,
    case_id: str,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert_caught_first(mistake, lambda: monkeypatch.setattr(*patch), case_id, named, tmp_path, monkeypatch, capsys)


def assert_caught_first(
    mistake: str,
    install: Callable[[], object],
    case_id: str,
    named: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong port: the reference with `install()`'s patches dumps its outputs for `case_id`;
    the runner must fail the case, its first divergence starting with `named`."""
    install()
    dump_port(tmp_path, case_id)
    monkeypatch.undo()
    message = first_divergence(tmp_path, case_id, capsys)
    assert message.startswith(named), f"{mistake}: first divergence was {message!r}"
