"""The rank allocator on every backend, with cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adalora_ref.allocator import (
    ImportanceState,
    RankAllocator,
    budget_schedule,
    kth_smallest,
    mask_using_rank_pattern,
    sensitivity,
    triplet_score,
    update_importance,
)
from adalora_ref.layer import SVDTriplet, TripletGrads

from .conftest import Backend


def triplet(be: Backend, A, E, B) -> SVDTriplet:
    return SVDTriplet(be.asarray(A), be.asarray(E), be.asarray(B))


def grads(be: Backend, A, E, B) -> TripletGrads:
    return TripletGrads(be.asarray(A), be.asarray(E), be.asarray(B))


def test_budget_schedule_by_hand() -> None:
    kw = {"init_bgt": 10, "target_bgt": 4, "tinit": 2, "tfinal": 3, "total_step": 12, "deltaT": 2}
    # warm-up: step <= tinit keeps the full budget and never masks
    assert budget_schedule(0, **kw) == (10, False)
    assert budget_schedule(2, **kw) == (10, False)
    # budgeting: mul = 1 - (step - 2) / 7; budget = int(6 * mul**3 + 4); mask when step % 2 == 0
    assert budget_schedule(3, **kw) == (int(6 * (6 / 7) ** 3 + 4), False)  # 7.77.. -> 7
    assert budget_schedule(3, **kw)[0] == 7
    assert budget_schedule(4, **kw) == (6, True)  # 6 * (5/7)^3 + 4 = 6.18.. -> 6
    assert budget_schedule(9, **kw) == (4, False)  # mul = 0 at step total_step - tfinal
    # final phase: step > total_step - tfinal, target budget, always masked, also past total_step
    assert budget_schedule(10, **kw) == (4, True)
    assert budget_schedule(100, **kw) == (4, True)


def test_update_importance_by_hand(xp: Backend) -> None:
    p, g = xp.asarray([[1.0], [2.0]]), xp.asarray([[0.5], [-1.0]])
    ipt = sensitivity(p, g)
    np.testing.assert_allclose(xp.to_numpy(ipt), [[0.5], [2.0]])
    state = ImportanceState.zeros_like(p)
    update_importance(state, ipt, beta1=0.5, beta2=0.5)
    np.testing.assert_allclose(xp.to_numpy(state.ipt), [[0.5], [2.0]])
    np.testing.assert_allclose(xp.to_numpy(state.exp_avg_ipt), [[0.25], [1.0]])
    # uncertainty against the exp_avg_ipt JUST updated: 0.5 * |0.5 - 0.25|, 0.5 * |2 - 1|
    np.testing.assert_allclose(xp.to_numpy(state.exp_avg_unc), [[0.125], [0.5]])
    update_importance(state, sensitivity(p, g), beta1=0.5, beta2=0.5)
    np.testing.assert_allclose(xp.to_numpy(state.exp_avg_ipt), [[0.375], [1.5]])
    np.testing.assert_allclose(xp.to_numpy(state.exp_avg_unc), [[0.125], [0.5]])


def test_allocator_updates_its_own_arrays_in_place(xp: Backend) -> None:
    """The averages are written into the arrays the allocator made; the first step's three are separate."""
    alloc = two_layer_allocator()
    p = params(xp)
    g = {n: TripletGrads(*(t * 0.5 for t in (tr.lora_A, tr.lora_E, tr.lora_B))) for n, tr in p.items()}
    alloc.update_ipt(p, g)
    state = alloc.state["l1"]["lora_B"]
    avg, unc = state.exp_avg_ipt, state.exp_avg_unc
    assert avg is not unc and avg is not state.ipt
    first = xp.to_numpy(avg).copy()  # 0.5 * |1 * 0.5|
    np.testing.assert_allclose(first, np.full((3, 2), 0.25))
    alloc.update_ipt(p, g)
    assert alloc.state["l1"]["lora_B"].exp_avg_ipt is avg  # the same array, updated
    np.testing.assert_allclose(xp.to_numpy(avg), np.full((3, 2), 0.375))
    unc_now = xp.to_numpy(alloc.state["l1"]["lora_B"].exp_avg_unc)
    np.testing.assert_allclose(unc_now, np.full((3, 2), 0.125))  # 0.5 * 0.125 + 0.5 * |0.5 - 0.375|


def test_triplet_score_by_hand(xp: Backend) -> None:
    """score[i] = s_E[i] + mean_j s_A[i, j] + mean_k s_B[k, i], s = exp_avg_ipt * exp_avg_unc."""

    def state(ipt_avg, unc):
        return ImportanceState(xp.asarray(ipt_avg), xp.asarray(ipt_avg), xp.asarray(unc))

    states = {
        "lora_A": state([[1.0, 3.0], [2.0, 2.0]], [[1.0, 1.0], [0.5, 1.5]]),  # s_A rows mean: 2, 2
        "lora_E": state([[2.0], [1.0]], [[0.5], [4.0]]),  # s_E: 1, 4
        "lora_B": state([[1.0, 0.0], [3.0, 2.0], [2.0, 1.0]], [[3.0, 0.0], [1.0, 1.0], [0.0, 3.0]]),  # cols: 2, 5/3
    }
    np.testing.assert_allclose(xp.to_numpy(triplet_score(states)), [1 + 2 + 2, 4 + 2 + 5 / 3], rtol=1e-6)


def test_kth_smallest(xp: Backend) -> None:
    v = xp.asarray([3.0, 1.0, 2.0, 1.0])
    assert kth_smallest(v, 1) == 1.0
    assert kth_smallest(v, 3) == 2.0
    assert kth_smallest(v, 0) == -math.inf  # peft's torch.kthvalue raises here
    with pytest.raises(ValueError, match="cannot prune 5 rows: only 4"):
        kth_smallest(v, 5)


def two_layer_allocator(**kw) -> RankAllocator:
    args = {"target_r": 1, "tinit": 0, "tfinal": 0, "total_step": 10, "deltaT": 1, "beta1": 0.5, "beta2": 0.5}
    args.update(kw)
    return RankAllocator({"l1": 2, "l2": 2}, **args)


def set_scores(alloc: RankAllocator, be: Backend, scores: dict[str, list[float]]) -> None:
    """Importance state whose triplet scores are exactly `scores` (E carries them, A and B zero)."""
    alloc.state = {}
    for name, s in scores.items():
        r = len(s)
        column = np.asarray(s)[:, None]  # (r, 1)
        alloc.state[name] = {  # separate arrays: the allocator updates its state in place
            "lora_A": ImportanceState(*(be.asarray(np.zeros((r, 3))) for _ in range(3))),
            "lora_E": ImportanceState(be.asarray(column), be.asarray(column), be.asarray(np.ones((r, 1)))),
            "lora_B": ImportanceState(*(be.asarray(np.zeros((3, r))) for _ in range(3))),
        }


def params(be: Backend, r: int = 2) -> dict[str, SVDTriplet]:
    E = np.arange(1.0, r + 1)[:, None]
    return {n: triplet(be, np.ones((r, 3)), E, np.ones((3, r))) for n in ("l1", "l2")}


def test_mask_prunes_k_smallest_and_keeps_ranknum_free(xp: Backend) -> None:
    alloc = two_layer_allocator()
    set_scores(alloc, xp, {"l1": [4.0, 1.0], "l2": [3.0, 2.0]})
    out = alloc.mask_to_budget(params(xp), budget=2)  # k = 4 - 2 = 2: threshold = 2.0
    assert out.threshold == 2.0
    assert out.rank_pattern == {"l1": [True, False], "l2": [True, False]}
    np.testing.assert_array_equal(xp.to_numpy(out.lora_E["l1"]), [[1.0], [0.0]])
    np.testing.assert_array_equal(xp.to_numpy(out.lora_E["l2"]), [[1.0], [0.0]])


def test_ties_at_threshold_all_go(xp: Backend) -> None:
    """peft prunes score <= threshold: with a tie at the threshold, more than k rows go."""
    alloc = two_layer_allocator()
    set_scores(alloc, xp, {"l1": [2.0, 1.0], "l2": [2.0, 5.0]})
    out = alloc.mask_to_budget(params(xp), budget=2)  # k = 2: sorted 1, 2, 2, 5 -> threshold 2
    assert out.rank_pattern == {"l1": [False, False], "l2": [False, True]}


def test_all_zero_scores_prune_everything(xp: Backend) -> None:
    """In the first steps all scores can be 0: the threshold is 0 and every row is <= 0."""
    alloc = two_layer_allocator()
    set_scores(alloc, xp, {"l1": [0.0, 0.0], "l2": [0.0, 0.0]})
    out = alloc.mask_to_budget(params(xp), budget=3)
    assert out.threshold == 0.0
    assert out.rank_pattern == {"l1": [False, False], "l2": [False, False]}


def test_k_zero_prunes_nothing(xp: Backend) -> None:
    """init_r == target_r: k = 0 at every masking. peft crashes in kthvalue; we prune nothing."""
    alloc = two_layer_allocator(target_r=2)
    p = params(xp)
    g = {n: grads(xp, np.ones((2, 3)), np.ones((2, 1)), np.ones((3, 2))) for n in p}
    out = alloc.update_and_allocate(p, g, 1)
    assert out.masked and out.threshold == -math.inf and out.budget == 4
    assert out.rank_pattern == {"l1": [True, True], "l2": [True, True]}
    np.testing.assert_array_equal(xp.to_numpy(out.lora_E["l1"]), xp.to_numpy(p["l1"].lora_E))


def test_layer_with_r_zero(xp: Backend) -> None:
    alloc = RankAllocator({"empty": 0, "l": 2}, target_r=1, tinit=0, tfinal=0, total_step=5)
    assert alloc.init_bgt == 2 and alloc.target_bgt == 2
    p = {"empty": triplet(xp, np.zeros((0, 3)), np.zeros((0, 1)), np.zeros((4, 0))), "l": params(xp)["l1"]}
    g = {
        "empty": grads(xp, np.zeros((0, 3)), np.zeros((0, 1)), np.zeros((4, 0))),
        "l": grads(xp, np.ones((2, 3)), np.ones((2, 1)), np.ones((3, 2))),
    }
    out = alloc.update_and_allocate(p, g, 1, force_mask=True)
    assert out.rank_pattern is not None and out.rank_pattern["empty"] == []


@pytest.mark.parametrize("where", ["param", "grad"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_refused_and_state_unchanged(xp: Backend, where: str, bad: float) -> None:
    alloc = two_layer_allocator()
    p = params(xp)
    g = {n: grads(xp, np.ones((2, 3)), np.ones((2, 1)), np.ones((3, 2))) for n in p}
    alloc.update_ipt(p, g)
    before = xp.to_numpy(alloc.state["l1"]["lora_B"].exp_avg_ipt).copy()
    B = np.ones((3, 2))
    B[1, 0] = bad
    if where == "param":
        p["l2"] = triplet(xp, np.ones((2, 3)), np.ones((2, 1)), B)
    else:
        g["l2"] = grads(xp, np.ones((2, 3)), np.ones((2, 1)), B)
    name = "l2.lora_B" if where == "param" else "l2.lora_B gradient"
    with pytest.raises(ValueError, match=f"{name} holds NaN or Inf"):
        alloc.update_ipt(p, g)
    np.testing.assert_array_equal(xp.to_numpy(alloc.state["l1"]["lora_B"].exp_avg_ipt), before)


def test_missing_extra_layers_and_wrong_shapes(xp: Backend) -> None:
    alloc = two_layer_allocator()
    p = params(xp)
    g = {"l1": grads(xp, np.ones((2, 3)), np.ones((2, 1)), np.ones((3, 2)))}
    with pytest.raises(ValueError, match=r"grads do not match the allocator's layers: missing \['l2'\], extra \[\]"):
        alloc.update_ipt(p, g)
    g["l2"] = g["l1"]
    g["l3"] = g["l1"]
    with pytest.raises(ValueError, match=r"missing \[\], extra \['l3'\]"):
        alloc.update_ipt(p, g)
    del g["l3"]
    g["l2"] = grads(xp, np.ones((2, 4)), np.ones((2, 1)), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"l2.lora_A grad has shape \(2, 4\), expected \(2, 3\)"):
        alloc.update_ipt(p, g)


def test_step_going_backwards_is_refused(xp: Backend) -> None:
    alloc = two_layer_allocator()
    p = params(xp)
    g = {n: grads(xp, np.ones((2, 3)), np.ones((2, 1)), np.ones((3, 2))) for n in p}
    alloc.update_and_allocate(p, g, 3)
    with pytest.raises(ValueError, match="step 2 comes after step 3"):
        alloc.update_and_allocate(p, g, 2)


def test_masking_before_any_importance_is_refused(xp: Backend) -> None:
    with pytest.raises(ValueError, match="no importance yet"):
        two_layer_allocator().mask_to_budget(params(xp), 2)


def test_mask_using_rank_pattern(xp: Backend) -> None:
    out = mask_using_rank_pattern(params(xp), {"l1": [False, True], "l2": [True, True]})
    np.testing.assert_array_equal(xp.to_numpy(out["l1"]), [[0.0], [2.0]])
    np.testing.assert_array_equal(xp.to_numpy(out["l2"]), [[1.0], [2.0]])
    with pytest.raises(ValueError, match=r"rank_pattern\['l1'\] has 1 flags, the layer has r = 2"):
        mask_using_rank_pattern(params(xp), {"l1": [True], "l2": [True, True]})


def test_betas_validated() -> None:
    with pytest.raises(ValueError, match=r"beta1 must satisfy 0 < beta1 < 1, got 1\.0"):
        two_layer_allocator(beta1=1.0)
