"""orth: the orthogonal regularizer and its gradients through peft's AdaLoraModel.forward, whose
output `.loss` is the task loss (exactly 0 here) plus the regularizer (docs/SPEC.md 14.4)."""

from __future__ import annotations

import torch

from adalora_ref.conformance.case import Case

from .common import TORCH_DTYPES, Generated, Stack, adalora, case, lora, record, t2n, tensor


def cases() -> Generated:
    yield gen_orth("basic_f64", "float64", 201, 4, 0.5, False), {}
    yield gen_orth("zero_norm_f64", "float64", 202, 4, 0.1, True), {}
    yield gen_orth("r_zero_f64", "float64", 203, 0, 0.5, False), {}
    yield gen_orth("basic_f32", "float32", 204, 4, 0.5, False), {}


def gen_orth(name: str, dtype: str, seed: int, init_r: int, weight: float, orthonormal_first: bool) -> Case:
    layers = [("q", 8, 8), ("v", 8, 12), ("fc", 12, 5)]
    config = {"orth_reg_weight": weight, "layers": [[n, init_r, i, o] for n, i, o in layers]}
    c = case("orth", name, dtype, f"orthogonal regularizer and its gradients: {name}", config, seed)
    torch.manual_seed(seed)
    model = adalora(
        Stack(layers).to(TORCH_DTYPES[dtype]),
        target_modules=[n for n, _, _ in layers],
        init_r=init_r,
        target_r=0,
        total_step=10,
        init_lora_weights=False,
        orth_reg_weight=weight,
    )
    inner = model.base_model.model
    if orthonormal_first:  # rows of the identity: ||A A^T - I|| is exactly 0 and torch's gradient is 0
        with torch.no_grad():
            A = lora(inner.q, "lora_A")
            A.zero_()
            for i in range(init_r):
                A[i, i] = 1.0
    loss = model.base_model(torch.zeros(2, 8, dtype=TORCH_DTYPES[dtype])).loss  # the task loss is exactly 0
    loss.backward()
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            c.inputs[f"{n}.{part}"] = t2n(lora(getattr(inner, n), part))
    record(c, tensor("value", "regularizer value"), t2n(loss))
    for n, _, _ in layers:
        for part in ("lora_A", "lora_B"):
            record(
                c,
                tensor(f"grad.{n}.{part}", f"regularizer gradient of {part}", layer=n),
                t2n(lora(getattr(inner, n), part).grad),
            )
    return c
