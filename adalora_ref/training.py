"""One AdaLoRA training step, in exactly peft's order. Read `train_step` as the specification.

    1. forward                      y = model(x)
    2. loss + orthogonal term       L = loss(y, target) + R(A, B)        (peft: AdaLoraModel.forward)
    3. backward                     dL/dA, dL/dE, dL/dB (R's gradient added to A and B)
       finiteness check             a NaN or Inf loss or gradient refuses the step (below)
    4. optimizer step               AdamW on A, E, B
    5. update_and_allocate(step)    importance from the NEW parameters times the OLD gradients,
                                    then budget and masking of E
    6. zero gradients               (here the gradients are values of this call: nothing to zero)

A step is all or nothing. Before any parameter moves, the loss and every gradient are checked, as
torch's GradScaler checks gradients before its optimizer step: a non-finite one raises
NonFiniteStepError naming the tensor (or the batch, when x or the target holds the NaN), and the
model, the optimizer and the allocator are exactly as before, so the next clean batch trains as if
the bad one never came. peft has no such check (a NaN batch ruins its adapters). Should the
allocator refuse the step after the optimizer step, the parameters and the optimizer state are put
back as well (nothing is updated in place, so the old arrays are simply restored).

peft adds R only when the wrapped model's output has a `.loss` tensor (a task-typed PeftModel, or
`peft_model.base_model(...)`); a port that trains without it must set orth_reg=False here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ._backend import Array, namespace
from .allocator import PARTS, Allocation
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
    flat_grads = _flat(grads)  # "<layer>.lora_A", ... and the trainable base parameters' names
    _refuse_non_finite(global_step, loss, flat_grads, {"x": x, "target": target})
    triplets, base, moments = model.triplets(), model.base_params(), dict(optimizer.state)
    _optimizer_step(model, flat_grads, optimizer)
    try:
        allocation = model.update_and_allocate(global_step, grads.triplets)
    except BaseException:  # the allocator refused (its own state is untouched): undo the optimizer step
        model.set_triplets(triplets)
        model.set_base_params(base)
        optimizer.state = moments
        raise
    return StepResult(float(loss), float(reg), allocation)


class NonFiniteStepError(ValueError):
    """A training step refused before the optimizer step: its loss or a gradient is NaN or Inf."""


def _flat(grads: NetGrads) -> dict[str, Array]:
    """Every gradient of a step by parameter name: `<layer>.lora_A` / `.lora_E` / `.lora_B`, then the
    trainable base parameters under peft's names."""
    flat = {f"{n}.{p}": getattr(g, p) for n, g in grads.triplets.items() for p in PARTS}
    flat.update(grads.base)
    return flat


def _refuse_non_finite(global_step: int, loss: Array, named: Mapping[str, Array], batch: Mapping[str, Array]) -> None:
    """Raise NonFiniteStepError when the loss or any gradient is not finite, naming the culprit.

    The common case is one sum per gradient and one transfer to the host (a sum is NaN or Inf when
    any element is); only a failure looks further, at the batch first, then tensor by tensor.
    """
    xp = namespace(loss)
    sums = xp.stack([loss, *(xp.sum(g) for g in named.values() if math.prod(g.shape))])
    if bool(xp.all(xp.isfinite(sums))):
        return
    refused = f"step {global_step} refused, nothing changed"
    for what, value in batch.items():
        if not bool(xp.all(xp.isfinite(value))):
            raise NonFiniteStepError(f"{refused}: the batch's {what} holds NaN or Inf")
    if not bool(xp.all(xp.isfinite(loss))):
        raise NonFiniteStepError(f"{refused}: the loss is {float(loss)} (the batch is finite)")
    for name, g in named.items():
        if not bool(xp.all(xp.isfinite(g))):
            raise NonFiniteStepError(f"{refused}: the gradient of {name} holds NaN or Inf (the batch is finite)")


def _add_orth(g: TripletGrads, reg_A: Array, reg_B: Array) -> TripletGrads:
    return TripletGrads(g.lora_A + reg_A, g.lora_E, g.lora_B + reg_B)


def _optimizer_step(model: AdaLoraModel, flat_grads: Mapping[str, Array], optimizer: AdamW) -> None:
    """AdamW over `<layer>.lora_A` / `.lora_E` / `.lora_B` and the trainable base parameters, written back."""
    triplets = model.triplets()
    params = {f"{n}.{p}": getattr(t, p) for n, t in triplets.items() for p in PARTS}
    base = model.base_params()
    params.update(base)
    new = optimizer.step(params, flat_grads)
    model.set_triplets({n: SVDTriplet(*(new[f"{n}.{p}"] for p in PARTS)) for n in triplets})
    model.set_base_params({key: new[key] for key in base if key in flat_grads})
