"""A model of named linear and conv layers with AdaLoRA adapters on the targeted ones, and peft's lifecycle.

`AdaLoraModel` holds base layers by name: `BaseLinear` (weight, optional bias) and `BaseConv2d`
(conv.py: kernel, bias, stride, padding, dilation). The layers an adapter's config targets
(`target_modules`, peft's matching, see config.is_target) are wrapped in `SVDLinear` or
`SVDConv2d` with r = init_r and the config's lora_alpha, in the order the layers were given (peft
wraps in the order of `named_modules()`, which is the definition order). A conv triplet is an
ordinary triplet whose A has in_channels * kh * kw columns: the allocator, the orthogonal term,
resizing and checkpoints treat it exactly like a linear one, as peft does.

Adapters, as peft: one trainable adapter (its config has inference_mode False) plus any number in
inference mode; adding a second trainable one is refused with peft's error. The forward sums the
active adapters (`set_adapter`); the allocator and the orthogonal term see only the trainable one.

The lifecycle, `update_and_allocate(global_step, grads)`, is peft's AdaLoraModel.update_and_allocate:
    global_step <  total_step - tfinal: update importance, schedule, mask when the schedule says
                                         so; a rank pattern that comes back is stored in the config.
    global_step == total_step - tfinal: no importance update; mask with force to target_bgt; store
                                         the final rank pattern; reset the importance state.
    global_step >  total_step - tfinal: re-apply the stored rank pattern (zero the pruned E rows).

Rank pattern keys are `<module>.lora_E`, as peft writes them in adapter_config.json (peft keeps
`<module>.lora_E.<adapter>` in memory during training and strips the adapter name on save).
The forward of a whole network lives in mlp.py; the call order of a training step in training.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._backend import Array, check_step, device_of, namespace
from .allocator import Allocation, RankAllocator, mask_using_rank_pattern
from .config import AdaLoraConfig
from .conv import BaseConv2d, SVDConv2d
from .layer import SVDLinear, SVDTriplet, TripletGrads, check_base_linear, init_triplet
from .orth import orthogonal_regularizer
from .targets import is_module_to_save, is_target

E_SUFFIX = ".lora_E"
PEFT_ONE_TRAINABLE = (
    "AdaLoraModel supports only 1 trainable adapter. When using multiple adapters, set inference_mode to True "
    "for all adapters except the one you want to train."
)


@dataclass
class BaseLinear:
    """A frozen linear layer: weight (out, in), or (in, out) when the config says fan_in_fan_out."""

    weight: Array
    bias: Array | None = None


BaseLayer = BaseLinear | BaseConv2d
AdaptedLayer = SVDLinear | SVDConv2d


class AdaLoraModel:
    """Named linear and conv layers; the targeted ones carry AdaLoRA adapters."""

    def __init__(
        self,
        base_layers: Mapping[str, BaseLayer],
        config: AdaLoraConfig,
        rng: np.random.Generator | None = None,
        adapter_name: str = "default",
        *,
        fused: bool = False,
    ) -> None:
        """`fused` makes the allocator adalora_ref.fused.FusedRankAllocator, the compiled importance
        step (NumPy on the CPU, the `fast` extra); the default is the readable RankAllocator."""
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        self._allocator_class: type[RankAllocator] = RankAllocator
        if fused:
            from .fused import FusedRankAllocator  # ImportError naming the extra when numba is missing

            self._allocator_class = FusedRankAllocator
        if not base_layers:
            raise ValueError("AdaLoraModel needs at least one base layer")
        for name, base in base_layers.items():
            if not isinstance(base, (BaseLinear, BaseConv2d)):
                raise ValueError(f"layer {name!r} is a {type(base).__name__}, not a BaseLinear or BaseConv2d")
            if isinstance(base, BaseConv2d):
                base.check(name)
            else:
                check_base_linear(name, base.weight, base.bias, config.fan_in_fan_out)
        self.names = list(base_layers)
        self.base: dict[str, BaseLayer] = dict(base_layers)  # the layers no adapter targets
        self.adapted: dict[str, AdaptedLayer] = {}
        self.peft_config: dict[str, AdaLoraConfig] = {}
        self.active_adapters = [adapter_name]
        self.trainable_adapter_name: str | None = None
        self.allocator: RankAllocator | None = None
        self.add_adapter(adapter_name, config, rng)

    @property
    def config(self) -> AdaLoraConfig:
        """The trainable adapter's config (the first adapter's when all are in inference mode)."""
        return self.peft_config[self.trainable_adapter_name or next(iter(self.peft_config))]

    # -- adapters -----------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdaLoraConfig, rng: np.random.Generator | None = None) -> None:
        """Add an adapter on the layers `config` targets (not made active, as in peft)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already")
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(PEFT_ONE_TRAINABLE)
        rng = np.random.default_rng(0) if rng is None else rng
        targets = [name for name in self.names if is_target(config, name)]
        if not targets:
            raise ValueError(f"target_modules {config.target_modules!r} matched none of the layers {self.names}")
        for name in targets:
            self._attach(name, adapter_name, config, rng)
        self.peft_config[adapter_name] = config
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            for layer in self.adapted.values():
                layer.trainable_adapter = adapter_name
            self._rebuild_allocator()

    def _attach(self, name: str, adapter_name: str, config: AdaLoraConfig, rng: np.random.Generator) -> None:
        layer = self.adapted.get(name)
        weight = layer.weight if layer is not None else self.base[name].weight
        if len(weight.shape) == 4:  # a kernel (out, in, kh, kw): A spans one im2col patch
            n_in, n_out = math.prod(weight.shape[1:]), weight.shape[0]
        else:
            rows, cols = weight.shape
            n_in, n_out = (rows, cols) if config.fan_in_fan_out else (cols, rows)
        triplet = init_triplet(
            rng,
            config.init_r,
            n_in,
            n_out,
            init_lora_weights=config.init_lora_weights,
            xp=namespace(weight),
            dtype=weight.dtype,
            device=device_of(weight),
        )
        if layer is not None:
            layer.add_adapter(adapter_name, triplet, lora_alpha=config.lora_alpha)
            return
        base = self.base[name]
        if isinstance(base, BaseConv2d):  # peft ignores fan_in_fan_out for a Conv2d
            layer = SVDConv2d(
                base.weight,
                base.bias,
                triplet,
                lora_alpha=config.lora_alpha,
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=base.groups,
                name=name,
                adapter_name=adapter_name,
            )
        else:
            layer = SVDLinear(
                base.weight,
                base.bias,
                triplet,
                lora_alpha=config.lora_alpha,
                fan_in_fan_out=config.fan_in_fan_out,
                name=name,
                adapter_name=adapter_name,
            )
        del self.base[name]
        layer.active_adapters = list(self.active_adapters)
        layer.trainable_adapter = self.trainable_adapter_name
        self.adapted[name] = layer

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters the active ones: the forward sums them (on the layers that have them)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"no adapter named {unknown}; adapters are {list(self.peft_config)}")
        self.active_adapters = names
        for layer in self.adapted.values():
            layer.active_adapters = list(names)

    def _rebuild_allocator(self) -> None:
        if self.trainable_adapter_name is not None:
            ranks = {name: triplet.r for name, triplet in self.triplets().items()}
            self.allocator = self._allocator_class.from_config(self.config, ranks)

    # -- parameters ---------------------------------------------------------------------------

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.trainable_adapter_name or next(iter(self.peft_config))
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r}; adapters are {list(self.peft_config)}")
        return name

    def triplets(self, adapter_name: str | None = None) -> dict[str, SVDTriplet]:
        """layer name -> the adapter's triplet (default: the trainable adapter), in layer order."""
        adapter = self._adapter(adapter_name)
        return {n: layer.adapters[adapter].triplet for n, layer in self.adapted.items() if adapter in layer.adapters}

    def set_triplets(self, triplets: Mapping[str, SVDTriplet], adapter_name: str | None = None) -> None:
        adapter = self._adapter(adapter_name)
        for name, triplet in triplets.items():
            layer = self.adapted[name]
            old = layer.adapters[adapter].triplet
            for part in ("lora_A", "lora_E", "lora_B"):
                new, before = getattr(triplet, part), getattr(old, part)
                if tuple(new.shape) != tuple(before.shape):
                    raise ValueError(f"{name}.{part}: new shape {tuple(new.shape)} != {tuple(before.shape)}")
            layer.adapters[adapter].triplet = triplet

    def set_lora_E(self, lora_E: Mapping[str, Array], adapter_name: str | None = None) -> None:
        triplets = self.triplets(adapter_name)
        self.set_triplets({n: SVDTriplet(triplets[n].lora_A, E, triplets[n].lora_B) for n, E in lora_E.items()})

    # -- base parameters that train: bias modes and modules_to_save ---------------------------

    def base_trainables(self, adapter_name: str | None = None) -> dict[str, tuple[str, str]]:
        """peft's name -> (layer, "weight" | "bias") for every base parameter that trains, as peft decides.

        The adapter's config (default: the trainable adapter's) says which: bias "all" trains every
        bias ("<layer>.bias", or "<layer>.base_layer.bias" under an adapter), "lora_only" the biases
        of adapted layers, "none" none; a layer in modules_to_save trains its weight and bias (peft
        trains a copy of it, "<layer>.modules_to_save.<adapter>.weight"; we train the layer itself and
        keep no untouched original). None of these enter the importance scores.
        """
        adapter = adapter_name or self.trainable_adapter_name
        if adapter is None:
            return {}
        c = self.peft_config[self._adapter(adapter)]
        out: dict[str, tuple[str, str]] = {}
        for name in self.names:
            layer = self.adapted.get(name) or self.base[name]
            if name in self.base and is_module_to_save(c, name):
                for attr in ("weight", "bias") if layer.bias is not None else ("weight",):
                    out[f"{name}.modules_to_save.{adapter}.{attr}"] = (name, attr)
            elif layer.bias is not None and (c.bias == "all" or (c.bias == "lora_only" and name in self.adapted)):
                out[f"{name}.base_layer.bias" if name in self.adapted else f"{name}.bias"] = (name, "bias")
        return out

    def base_params(self, adapter_name: str | None = None) -> dict[str, Array]:
        """The current values of the adapter's trainable base parameters, by peft's name."""
        return {key: getattr(self.layer(n), attr) for key, (n, attr) in self.base_trainables(adapter_name).items()}

    def set_base_params(self, values: Mapping[str, Array], adapter_name: str | None = None) -> None:
        trainables = self.base_trainables(adapter_name)
        for key, value in values.items():
            if key not in trainables:
                raise ValueError(f"{key!r} is not a trainable base parameter; they are {sorted(trainables)}")
            name, attr = trainables[key]
            before = getattr(self.layer(name), attr)
            if tuple(value.shape) != tuple(before.shape):
                raise ValueError(f"{key}: new shape {tuple(value.shape)} != {tuple(before.shape)}")
            setattr(self.layer(name), attr, value)

    def layer(self, name: str) -> AdaptedLayer | BaseLayer:
        return self.adapted[name] if name in self.adapted else self.base[name]

    # -- the orthogonal regularizer -----------------------------------------------------------

    def orthogonal_regularizer(self) -> tuple[Array, dict[str, tuple[Array, Array]]]:
        """(R, {layer: (dR/dA, dR/dB)}) over the trainable adapter, as peft adds R to the loss."""
        triplets = self.triplets()
        value, grads = orthogonal_regularizer(list(triplets.values()), self.config.orth_reg_weight)
        return value, dict(zip(triplets, grads, strict=True))

    # -- the lifecycle ------------------------------------------------------------------------

    def update_and_allocate(self, global_step: int, grads: Mapping[str, TripletGrads] | None) -> Allocation | None:
        """peft's AdaLoraModel.update_and_allocate: call after optimizer.step(), before zeroing gradients.

        `grads` are the trainable adapter's gradients of the step just taken (the importance uses
        the parameters after the optimizer step times the gradients from before it, as in peft).
        Returns what the allocator decided, or None in the final phase. `global_step` is an int >= 0
        (TypeError for 2.0, "3" or True; ValueError for a negative one).
        """
        global_step = check_step("global_step", global_step)
        if self.allocator is None:
            raise ValueError("this model has no trainable adapter (all are in inference_mode): nothing to allocate")
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
        last = self.allocator.last_step
        if last is not None and global_step < last:
            raise ValueError(f"step {global_step} comes after step {last}: steps must not go backwards")
        self.set_lora_E(mask_using_rank_pattern(self.triplets(), self.layer_rank_pattern()))
        self.allocator.last_step = global_step
        return None

    def _apply(self, allocation: Allocation) -> None:
        self.set_lora_E(allocation.lora_E)
        assert allocation.rank_pattern is not None
        self.config.rank_pattern = {name + E_SUFFIX: keep for name, keep in allocation.rank_pattern.items()}

    def layer_rank_pattern(self, adapter_name: str | None = None) -> dict[str, list[bool]]:
        """The adapter's rank pattern keyed by layer name (its config's keys are `<layer>.lora_E`)."""
        pattern = self.peft_config[self._adapter(adapter_name)].rank_pattern or {}
        return {key.removesuffix(E_SUFFIX): keep for key, keep in pattern.items()}

    def resize_by_rank_pattern(
        self, rank_pattern: Mapping[str, list[bool]] | None = None, adapter_name: str | None = None
    ) -> None:
        """Shrink every layer of the adapter to the rows its pattern keeps (default: the config's pattern).

        As peft's resize_modules_by_rank_pattern: A keeps rows, E keeps rows, B keeps columns, and
        ranknum keeps its old value so the layer's scale does not change. Quirks kept: the scaling is
        recomputed from the new r, which matters only when lora_alpha == 0 (scaling = float(r)); a
        layer left with no row gets ranknum 0, because peft copies the old ranknum back only when
        the new rank is > 0 (harmless: a layer with r = 0 adds nothing).
        The allocator is rebuilt for the new ranks.
        """
        adapter = self._adapter(adapter_name)
        pattern = self.layer_rank_pattern(adapter) if rank_pattern is None else dict(rank_pattern)
        pattern = {k.removesuffix(E_SUFFIX): v for k, v in pattern.items()}
        triplets = self.triplets(adapter)
        unknown = sorted(set(pattern) - set(triplets))
        if unknown:
            raise ValueError(f"rank pattern names layers this adapter does not adapt: {unknown}")
        for name, keep in pattern.items():
            layer, t = self.adapted[name], triplets[name]
            if len(keep) != t.r:
                raise ValueError(f"rank pattern for {name} has {len(keep)} flags, the layer has r = {t.r}")
            xp = namespace(layer.weight)
            rows = xp.asarray(np.flatnonzero(np.asarray(keep, dtype=bool)), device=device_of(layer.weight))
            resized = SVDTriplet(
                xp.take(t.lora_A, rows, axis=0),  # (r', in)
                xp.take(t.lora_E, rows, axis=0),  # (r', 1)
                xp.take(t.lora_B, rows, axis=1),  # (out, r')
            )
            old = layer.adapters[adapter]
            ranknum = float(old.ranknum[0]) if resized.r > 0 else 0.0
            layer.add_adapter(adapter, resized, lora_alpha=old.lora_alpha, ranknum=ranknum)
        if adapter == self.trainable_adapter_name:
            self._rebuild_allocator()
