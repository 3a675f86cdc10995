"""allocator: peft's update_and_allocate driven with chosen parameters and gradients at every step,
its importance state, scores, threshold and masks recorded (docs/SPEC.md 14.6)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from adalora_ref.conformance.case import Case

from .common import PARTS, TORCH_DTYPES, Generated, adalora, case, exact, lora, record, t2n, tensor

ALLOCATOR_CASES = [
    # name, layers (name, r, in, out), target_r, tinit, tfinal, total_step, deltaT, n_steps, zero-gradient layers
    ("phases", [("q", 6, 10, 10), ("v", 6, 10, 16), ("fc", 6, 16, 8)], 3, 3, 6, 24, 2, 28, []),
    ("every_step", [("a", 4, 6, 6), ("b", 4, 6, 9)], 2, 0, 0, 10, 1, 12, []),
    ("ties", [("a", 4, 6, 6), ("b", 4, 6, 6), ("dead", 4, 6, 6)], 2, 0, 2, 10, 1, 12, ["dead"]),
    ("r_zero_layer", [("a", 5, 7, 7), ("empty", 0, 7, 5), ("b", 5, 5, 7)], 2, 1, 2, 12, 2, 14, []),
]


FROM_STEP_0 = ("from_step_0", [("a", 4, 6, 6), ("b", 4, 6, 9)], 2, 0, 2, 12, 2, 14, [])  # steps 0..13, tinit 0
# suite 1.1, from the mutation run's blind spots: target_r 0 (the final masking prunes every row: k is the
# number of triplets) on layers of one input feature (a) and one output feature (b)
PRUNE_ALL = ("prune_all", [("a", 4, 1, 6), ("b", 4, 6, 1)], 0, 1, 2, 10, 2, 12, [])


def cases() -> Generated:
    for i, spec in enumerate(ALLOCATOR_CASES):
        yield gen_allocator(spec, "float64", 400 + i), {}
    yield gen_allocator(ALLOCATOR_CASES[0], "float32", 410), {}
    yield gen_allocator(FROM_STEP_0, "float64", 411, first_step=0), {}
    yield gen_allocator(PRUNE_ALL, "float64", 412), {}


@contextlib.contextmanager
def capture_kthvalue(store: list) -> Iterator[None]:
    """Record the scores and k that peft's mask_to_budget hands to torch.kthvalue."""
    real = torch.kthvalue

    def spy(values, k, *args, **kwargs):
        result = real(values, k, *args, **kwargs)
        store.append((values.detach().clone(), k, result[0].item()))
        return result

    torch.kthvalue = spy
    try:
        yield
    finally:
        torch.kthvalue = real


def gen_allocator(spec: tuple, dtype: str, seed: int, *, first_step: int = 1) -> Case:
    """`first_step`: the step of the first update_and_allocate call (a case's config says it when it is
    not 1); the case runs n_steps steps from there."""
    name, layers, target_r, tinit, tfinal, total_step, delta, n_steps, dead = spec
    hyper = {
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "total_step": total_step,
        "deltaT": delta,
        "beta1": 0.85,
        "beta2": 0.85,
    }
    config = {**hyper, "init_r": layers[0][1], "layers": [list(layer) for layer in layers], "n_steps": n_steps}
    if first_step != 1:
        config["first_step"] = first_step
    c = case(
        "allocator",
        f"{name}_{dtype[-2:]}",
        dtype,
        f"importance, scores and masking over {n_steps} steps: {name}",
        config,
        seed,
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    stack = torch.nn.Module()
    for layer_name, _, n_in, n_out in layers:
        stack.add_module(layer_name, torch.nn.Linear(n_in, n_out).to(torch_dtype))
    # peft gives every targeted layer init_r; a layer listed with a smaller r is rebuilt at that r with
    # peft's own update_layer, and the allocator's budget recounted from the actual ranks.
    model = adalora(stack, target_modules=[n for n, *_ in layers], init_r=layers[0][1], **hyper)
    inner = model.base_model.model
    for layer_name, r, _, _ in layers:
        if r != layers[0][1]:
            module = getattr(inner, layer_name)
            module.update_layer("default", r, 8, config=model.peft_config["default"])
    allocator = model.base_model.rankallocator
    allocator._set_budget_scheduler(inner)  # count the budget from the layers' actual ranks
    params = {(n, part): t2n(lora(getattr(inner, n), part)).astype(np.float64) for n, *_ in layers for part in PARTS}
    final_step = total_step - tfinal
    for step in range(first_step, first_step + n_steps):
        for (n, part), value in params.items():
            p = lora(getattr(inner, n), part)
            noise = rng.normal(size=value.shape) * 0.05
            with torch.no_grad():
                p.copy_(torch.tensor(value + noise))
            grad = rng.normal(size=value.shape) * (0.0 if n in dead else 1.0)
            p.grad = torch.tensor(grad, dtype=torch_dtype)
            c.inputs[f"step{step}.{n}.{part}"] = t2n(p)
            c.inputs[f"step{step}.{n}.{part}.grad"] = t2n(p.grad)
        captured: list = []
        with capture_kthvalue(captured):
            model.base_model.update_and_allocate(step)
        if step < final_step:
            record_importance(c, step, allocator, [n for n, *_ in layers])
        if step <= final_step:
            budget, mask_ind = allocator.budget_schedule(step)
            record(c, exact(f"step{step}.budget", "budget", step=step), budget)
            masked = bool(mask_ind) or step == final_step
            record(c, exact(f"step{step}.masked", "masking flag", step=step), masked)
            if masked:  # in the order they are computed: scores, threshold, then the decisions
                record_scores(c, step, captured, [(n, r) for n, r, _, _ in layers])
                pattern = model.peft_config["default"].rank_pattern
                for n, *_ in layers:
                    record(
                        c,
                        exact(f"step{step}.rank_pattern.{n}", "rank pattern", step=step, layer=n),
                        pattern[f"{n}.lora_E.default"],
                    )
        for n, *_ in layers:
            record(
                c,
                tensor(f"step{step}.lora_E.{n}", "lora_E after update_and_allocate", step=step, layer=n),
                t2n(lora(getattr(inner, n), "lora_E")),
            )
        params = {
            (n, part): t2n(lora(getattr(inner, n), part)).astype(np.float64) for n, *_ in layers for part in PARTS
        }
    return c


def record_importance(c: Case, step: int, allocator: Any, names: list[str]) -> None:
    """peft's importance state after `step`'s update: ipt, exp_avg_ipt, exp_avg_unc of every part of
    every layer, in that order (the allocator kind, and the trajectories that localise)."""
    for n in names:
        for part in PARTS:
            key = f"{n}.{part}.default"
            for quantity, state in (
                ("ipt", allocator.ipt),
                ("exp_avg_ipt", allocator.exp_avg_ipt),
                ("exp_avg_unc", allocator.exp_avg_unc),
            ):
                record(
                    c,
                    tensor(f"step{step}.{quantity}.{n}.{part}", quantity, step=step, layer=f"{n}.{part}"),
                    t2n(state[key]),
                )


def record_scores(c: Case, step: int, captured: list, ranks: list[tuple[str, int]]) -> None:
    """The triplet scores of each layer (name, r) and the threshold that peft's masking at `step` handed
    to torch.kthvalue (`captured` by capture_kthvalue), and the margin of its decisions."""
    ((scores, _k, threshold),) = captured
    offset = 0
    for n, r in ranks:
        record(
            c,
            tensor(f"step{step}.scores.{n}", "triplet scores", step=step, layer=n),
            t2n(scores[offset : offset + r]),
        )
        offset += r
    record(c, tensor(f"step{step}.threshold", "threshold", step=step), np.asarray(threshold, dtype=c.dtype))
    c.margins[f"step {step}"] = decision_margin(t2n(scores).astype(np.float64), threshold)


def decision_margin(scores: np.ndarray, threshold: float) -> float:
    """How far the nearest score other than those equal to the threshold sits from it, relative to the
    largest score: a port whose scores err by less than this makes every mask decision as peft does."""
    scale = float(np.max(np.abs(scores))) or 1.0
    others = np.abs(scores[scores != threshold] - threshold)
    return float(np.min(others)) / scale if others.size else float("inf")
