"""init: what peft draws for a fresh adapter (docs/SPEC.md 14.3). The draws themselves are torch's
RNG, which a port does not share: the case holds lora_E (deterministic) and sample statistics.

The first cases' tolerances are fixed (5% for the std of A and B, 20% for E's, five standard errors
for a mean); with 256 draws of E a correct port fails `std.lora_E` with probability ~1e-4. The
`_sound` case (suite 1.1) draws enough (r = 8192) and sets every tolerance at six standard
deviations of the difference a correct port shows: P(fail) about 1e-8 for the whole case."""

from __future__ import annotations

import numpy as np
import torch

from adalora_ref.conformance.case import Case, Check

from .common import PARTS, Generated, Stack, adalora, case, lora, record, t2n, tensor


def cases() -> Generated:
    yield gen_init(True, 101), {}
    yield gen_init(False, 102), {}
    yield gen_init(False, 103, shape=(64, 64, 8192), sound=True), {}
    yield gen_init(True, 104, shape=(6, 5, 0)), {}  # suite 1.2: init_r = 0, the mutation run's blind spot


def gen_init(init_lora_weights: bool, seed: int, *, shape: tuple = (512, 384, 256), sound: bool = False) -> Case:
    n_in, n_out, r = shape
    config = {"in_features": n_in, "out_features": n_out, "r": r, "init_lora_weights": init_lora_weights, "seed": seed}
    name = ("default" if init_lora_weights else "init_lora_weights_false") + ("_sound" if sound else "")
    if r == 0:
        name = "r_zero"
    what = "the three empty tensors" if r == 0 else "E, and mean and std of A, E, B"
    c = case("init", name, "float32", f"a fresh SVDLinear triplet ({name}): {what}", config, seed)
    torch.manual_seed(seed)
    model = adalora(
        Stack([("proj", n_in, n_out)]),
        target_modules=["proj"],
        init_r=r,
        target_r=0,
        total_step=10,
        init_lora_weights=init_lora_weights,
    )
    layer = model.base_model.model.proj
    if r == 0:  # nothing to draw: the triplet's three empty shapes are the whole check
        for part in PARTS:
            record(c, tensor(part, f"initial {part} (empty)", rtol=0.0), t2n(lora(layer, part)))
        return c
    if init_lora_weights:
        record(c, tensor("lora_E", "initial lora_E", rtol=0.0), t2n(lora(layer, "lora_E")))
    for part in PARTS:  # sample statistics of >= 98k draws (E: 256): 5% (E: 20%) is well beyond their noise
        values = t2n(lora(layer, part)).astype(np.float64)
        loose = 0.2 if part == "lora_E" else 0.05
        if sound:  # two sample stds of n normal draws differ by ~ std / sqrt(n): six of those
            loose = 6 / np.sqrt(values.size)
        if not (init_lora_weights and part == "lora_E"):
            std = np.asarray(values.std(), dtype=np.float32)  # statistics stored in the case's dtype
            record(c, tensor(f"std.{part}", f"std of initial {part}", rtol=float(loose)), std)
            scale = values.std() / np.sqrt(values.size) * (6 if sound else 5)  # |mean| within 5 (6) standard errors
            mean = Check(f"mean.{part}", f"mean of initial {part}", "tensor", None, None, float(scale))
            record(c, mean, np.asarray(0.0, dtype=np.float32))
    return c
