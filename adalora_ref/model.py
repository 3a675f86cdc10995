"""A model of named linear layers with AdaLoRA on the targeted ones, and peft's training lifecycle.

`AdaLoraModel` holds base linear layers by name (weight, optional bias). The ones that the
config's `target_modules` selects (peft's matching, see config.is_target) are wrapped in
`SVDLinear` with r = init_r and the config's lora_alpha, in the order the layers were given (peft
wraps in the order of `named_modules()`, which is the definition order). It owns:

- `update_and_allocate(global_step, grads)`, peft's `AdaLoraModel.update_and_allocate`, the three
  phases:
    global_step <  total_step - tfinal: update importance, schedule, mask when the schedule says
                                         so; a rank pattern that comes back is stored in the config.
    global_step == total_step - tfinal: no importance update; mask with force to target_bgt; store
                                         the final rank pattern; reset the importance state.
    global_step >  total_step - tfinal: re-apply the stored rank pattern (zero the pruned E rows).
- `resize_by_rank_pattern`: each layer keeps only its kept rows and keeps its old ranknum.
- the orthogonal regularizer over its triplets.

Rank pattern keys are `<module>.lora_E`, as peft writes them in adapter_config.json (peft keeps
`<module>.lora_E.<adapter>` in memory during training and strips the adapter name on save).
The forward of a whole network lives in mlp.py; the call order of a training step in training.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._backend import Array, device_of, dtype_name_or_raise, namespace
from .allocator import Allocation, RankAllocator, mask_using_rank_pattern
from .config import AdaLoraConfig, is_target
from .layer import SVDLinear, SVDTriplet, TripletGrads, init_triplet
from .orth import orthogonal_regularizer

E_SUFFIX = ".lora_E"


@dataclass
class BaseLinear:
    """A frozen linear layer: weight (out, in), or (in, out) when the config says fan_in_fan_out."""

    weight: Array
    bias: Array | None = None


class AdaLoraModel:
    """Named linear layers; the targeted ones carry a trainable AdaLoRA triplet."""

    def __init__(
        self, base_layers: Mapping[str, BaseLinear], config: AdaLoraConfig, rng: np.random.Generator | None = None
    ) -> None:
        if not base_layers:
            raise ValueError("AdaLoraModel needs at least one base layer")
        self.config = config
        rng = np.random.default_rng(0) if rng is None else rng
        self.base: dict[str, BaseLinear] = {}
        self.adapted: dict[str, SVDLinear] = {}
        for name, base in base_layers.items():
            dtype_name_or_raise(f"{name}.weight", base.weight)
            if not is_target(config, name):
                self.base[name] = base
                continue
            xp = namespace(base.weight)
            rows, cols = base.weight.shape
            n_in, n_out = (rows, cols) if config.fan_in_fan_out else (cols, rows)
            triplet = init_triplet(
                rng,
                config.init_r,
                n_in,
                n_out,
                init_lora_weights=config.init_lora_weights,
                xp=xp,
                dtype=base.weight.dtype,
                device=device_of(base.weight),
            )
            self.adapted[name] = SVDLinear(
                base.weight,
                base.bias,
                triplet,
                lora_alpha=config.lora_alpha,
                fan_in_fan_out=config.fan_in_fan_out,
                name=name,
            )
        if not self.adapted:
            raise ValueError(f"target_modules {config.target_modules!r} matched none of the layers {list(base_layers)}")
        self.names = list(base_layers)
        self.allocator = None
        if not config.inference_mode:
            self.allocator = RankAllocator.from_config(config, {n: layer.r for n, layer in self.adapted.items()})

    # -- parameters ---------------------------------------------------------------------------

    def triplets(self) -> dict[str, SVDTriplet]:
        """layer name -> its trainable triplet, in layer order."""
        return {name: layer.triplet for name, layer in self.adapted.items()}

    def set_triplets(self, triplets: Mapping[str, SVDTriplet]) -> None:
        for name, triplet in triplets.items():
            old = self.adapted[name].triplet
            for part in ("lora_A", "lora_E", "lora_B"):
                new, before = getattr(triplet, part), getattr(old, part)
                if tuple(new.shape) != tuple(before.shape):
                    raise ValueError(f"{name}.{part}: new shape {tuple(new.shape)} != {tuple(before.shape)}")
            self.adapted[name].triplet = triplet

    def set_lora_E(self, lora_E: Mapping[str, Array]) -> None:
        for name, E in lora_E.items():
            t = self.adapted[name].triplet
            self.adapted[name].triplet = SVDTriplet(t.lora_A, E, t.lora_B)

    # -- the orthogonal regularizer -----------------------------------------------------------

    def orthogonal_regularizer(self) -> tuple[Array, dict[str, tuple[Array, Array]]]:
        """(R, {layer: (dR/dA, dR/dB)}) with the config's orth_reg_weight, as peft adds R to the loss."""
        value, grads = orthogonal_regularizer(list(self.triplets().values()), self.config.orth_reg_weight)
        return value, dict(zip(self.adapted, grads, strict=True))

    # -- the lifecycle ------------------------------------------------------------------------

    def update_and_allocate(self, global_step: int, grads: Mapping[str, TripletGrads] | None) -> Allocation | None:
        """peft's AdaLoraModel.update_and_allocate: call after optimizer.step(), before zeroing gradients.

        `grads` are the gradients of the step just taken (the importance uses the parameters after
        the optimizer step times the gradients from before it, as in peft). Returns what the
        allocator decided, or None in the final phase.
        """
        if self.allocator is None:
            raise ValueError("this model is in inference_mode: it has no trainable adapter to allocate")
        c = self.config
        final_step = c.total_step - c.tfinal
        if global_step < final_step:
            allocation = self.allocator.update_and_allocate(self.triplets(), grads, global_step)
            if allocation.rank_pattern:
                self._apply(allocation)
            return allocation
        if global_step == final_step:
            allocation = self.allocator.update_and_allocate(self.triplets(), grads, global_step, force_mask=True)
            self._apply(allocation)
            self.allocator.reset_ipt()
            return allocation
        if c.rank_pattern is None:
            raise ValueError(
                f"step {global_step} is past total_step - tfinal = {final_step} but no rank pattern is stored: "
                f"the final masking at step {final_step} never ran"
            )
        self.allocator.last_step = max(self.allocator.last_step or global_step, global_step)
        self.set_lora_E(mask_using_rank_pattern(self.triplets(), self.layer_rank_pattern()))
        return None

    def _apply(self, allocation: Allocation) -> None:
        self.set_lora_E(allocation.lora_E)
        assert allocation.rank_pattern is not None
        self.config.rank_pattern = {name + E_SUFFIX: keep for name, keep in allocation.rank_pattern.items()}

    def layer_rank_pattern(self) -> dict[str, list[bool]]:
        """The config's rank pattern keyed by layer name (its keys are `<layer>.lora_E`)."""
        pattern = self.config.rank_pattern or {}
        return {key.removesuffix(E_SUFFIX): keep for key, keep in pattern.items()}

    def resize_by_rank_pattern(self, rank_pattern: Mapping[str, list[bool]] | None = None) -> None:
        """Shrink every layer to the rows its pattern keeps (default: the config's rank pattern).

        As peft's resize_modules_by_rank_pattern: A keeps rows, E keeps rows, B keeps columns, and
        ranknum keeps its old value so the layer's scale does not change. Quirks kept: the scaling is
        recomputed from the new r, which matters only when lora_alpha == 0 (scaling = float(r)); a
        layer left with no row gets ranknum 0, because peft copies the old ranknum back only when
        the new rank is > 0 (harmless: a layer with r = 0 adds nothing).
        The allocator is rebuilt for the new ranks.
        """
        pattern = self.layer_rank_pattern() if rank_pattern is None else dict(rank_pattern)
        pattern = {k.removesuffix(E_SUFFIX): v for k, v in pattern.items()}
        unknown = sorted(set(pattern) - set(self.adapted))
        if unknown:
            raise ValueError(f"rank pattern names layers this model does not adapt: {unknown}")
        for name, keep in pattern.items():
            layer = self.adapted[name]
            if len(keep) != layer.r:
                raise ValueError(f"rank pattern for {name} has {len(keep)} flags, the layer has r = {layer.r}")
            xp = namespace(layer.weight)
            rows = xp.asarray(np.flatnonzero(np.asarray(keep, dtype=bool)), device=device_of(layer.weight))
            t = layer.triplet
            resized = SVDTriplet(
                xp.take(t.lora_A, rows, axis=0),  # (r', in)
                xp.take(t.lora_E, rows, axis=0),  # (r', 1)
                xp.take(t.lora_B, rows, axis=1),  # (out, r')
            )
            new_layer = SVDLinear(
                layer.weight,
                layer.bias,
                resized,
                lora_alpha=layer.lora_alpha,
                fan_in_fan_out=layer.fan_in_fan_out,
                ranknum=float(layer.ranknum[0]) if resized.r > 0 else 0.0,
                name=name,
            )
            new_layer.merged, new_layer.disable_adapters = layer.merged, layer.disable_adapters
            self.adapted[name] = new_layer
        if self.allocator is not None:
            self.allocator = RankAllocator.from_config(self.config, {n: layer.r for n, layer in self.adapted.items()})
