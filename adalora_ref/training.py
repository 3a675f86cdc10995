"""One AdaLoRA training step, in exactly peft's order. Read `train_step` as the specification.

    1. forward                      y = model(x)
    2. loss + orthogonal term       L = loss(y, target) + R(A, B)        (peft: AdaLoraModel.forward)
    3. backward                     dL/dA, dL/dE, dL/dB (R's gradient added to A and B)
    4. optimizer step               AdamW on A, E, B
    5. update_and_allocate(step)    importance from the NEW parameters times the OLD gradients,
                                    then budget and masking of E
    6. zero gradients               (here the gradients are values of this call: nothing to zero)

peft adds R only when the wrapped model's output has a `.loss` tensor (a task-typed PeftModel, or
`peft_model.base_model(...)`); a port that trains without it must set orth_reg=False here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._backend import Array
from .allocator import Allocation
from .layer import SVDTriplet, TripletGrads
from .mlp import MLP, NetGrads
from .model import AdaLoraModel
from .optim import AdamW

LossFn = Callable[[Array, Array], tuple[Array, Array]]


@dataclass
class StepResult:
    loss: float  # task loss plus orthogonal term, as peft's outputs.loss
    orth_reg: float
    allocation: Allocation | None


def train_step(
    net: MLP,
    optimizer: AdamW,
    x: Array,
    target: Array,
    global_step: int,
    loss_fn: LossFn,
    *,
    orth_reg: bool = True,
    dropout_masks: Mapping[str, Array] | None = None,
) -> StepResult:
    """Forward, loss (+ orthogonal term), backward, AdamW, update_and_allocate: peft's order."""
    model = net.model
    y, cache = net.forward(x, dropout_masks)
    loss, grad_y = loss_fn(y, target)
    grads = net.backward(cache, grad_y)
    reg = 0.0
    if orth_reg:
        reg, reg_grads = model.orthogonal_regularizer()
        loss = loss + reg
        grads.triplets = {name: _add_orth(g, *reg_grads[name]) for name, g in grads.triplets.items()}
    _optimizer_step(model, grads, optimizer)
    allocation = model.update_and_allocate(global_step, grads.triplets)
    return StepResult(float(loss), float(reg), allocation)


def _add_orth(g: TripletGrads, reg_A: Array, reg_B: Array) -> TripletGrads:
    return TripletGrads(g.lora_A + reg_A, g.lora_E, g.lora_B + reg_B)


def _optimizer_step(model: AdaLoraModel, grads: NetGrads, optimizer: AdamW) -> None:
    """AdamW over `<layer>.lora_A` / `.lora_E` / `.lora_B` and the trainable base parameters, written back."""
    parts = ("lora_A", "lora_E", "lora_B")
    triplets = model.triplets()
    params = {f"{n}.{p}": getattr(t, p) for n, t in triplets.items() for p in parts}
    flat_grads = {f"{n}.{p}": getattr(g, p) for n, g in grads.triplets.items() for p in parts}
    params.update(model.base_params())
    flat_grads.update(grads.base)
    new = optimizer.step(params, flat_grads)
    model.set_triplets({n: SVDTriplet(*(new[f"{n}.{p}"] for p in parts)) for n in triplets})
    model.set_base_params({key: new[key] for key in grads.base})
