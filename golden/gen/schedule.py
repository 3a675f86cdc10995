"""schedule: the budget and the mask flag at every step, from peft's RankAllocator.budget_schedule
(docs/SPEC.md 14.5)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adalora_ref.conformance.case import Case

from .common import Generated, Stack, adalora, case, exact, record

SCHEDULES = [
    # name, layer ranks, target_r, tinit, tfinal, total_step, deltaT
    ("default_like", [12] * 6, 8, 0, 0, 40, 1),
    ("tinit_tfinal_deltaT", [12] * 4, 4, 10, 15, 100, 7),
    ("tinit_zero", [6] * 3, 2, 0, 5, 30, 3),
    ("tfinal_zero", [6] * 3, 2, 4, 0, 30, 2),
    ("tiny_total_step", [4, 4], 1, 0, 0, 2, 1),
    ("init_equals_target", [5] * 3, 5, 2, 2, 12, 1),
    ("many_layers", [12] * 72, 8, 20, 30, 200, 10),
]


def cases() -> Generated:
    for spec in SCHEDULES:
        yield gen_schedule(spec, 300), {}


def gen_schedule(spec: tuple, seed: int) -> Case:
    name, ranks, target_r, tinit, tfinal, total_step, delta = spec
    steps = list(range(0, total_step + 4))
    config = {
        "layer_ranks": ranks,
        "target_r": target_r,
        "tinit": tinit,
        "tfinal": tfinal,
        "total_step": total_step,
        "deltaT": delta,
        "steps": steps,
    }
    c = case("schedule", name, "float64", f"budget schedule: {name}", config, seed)
    record_schedule(c)
    return c


def record_schedule(c: Case, build: Callable[..., Any] = adalora) -> None:
    """peft's budgets and mask flags at the steps of `c.config` (its layers all of rank layer_ranks[0]);
    `build` makes the peft model (ports/peft/driver.py passes its own, for older releases)."""
    config = c.config
    layers = [(f"l{i}", 4, 4) for i in range(len(config["layer_ranks"]))]
    model = build(
        Stack(layers),
        target_modules=[n for n, _, _ in layers],
        init_r=config["layer_ranks"][0],
        target_r=config["target_r"],
        tinit=config["tinit"],
        tfinal=config["tfinal"],
        total_step=config["total_step"],
        deltaT=config["deltaT"],
    )
    allocator = model.base_model.rankallocator
    record(c, exact("init_bgt", "initial budget"), allocator.init_bgt)
    record(c, exact("target_bgt", "target budget"), allocator.target_bgt)
    for step in config["steps"]:
        budget, mask = allocator.budget_schedule(step)
        record(c, exact(f"step{step}.budget", "budget", step=step), budget)
        record(c, exact(f"step{step}.mask", "mask flag", step=step), bool(mask))
