"""AdamW written out as torch.optim.AdamW computes it (torch 2.13, CPU, single-tensor path).

Defaults are torch's: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2. For every
parameter p with gradient g, at step t (counted per parameter, starting at 1):

    p     = p * (1 - lr * weight_decay)                    decoupled weight decay, first
    m     = m + (1 - beta1) * (g - m)                      torch's lerp_(g, 1 - beta1)
    v     = v * beta2 + (1 - beta2) * g * g
    denom = sqrt(v) / sqrt(1 - beta2**t) + eps
    p     = p - (lr / (1 - beta1**t)) * m / denom

A parameter whose gradient is None is skipped and its step count does not advance, as torch skips
parameters whose `.grad` is None. This module owns only the optimizer; it knows nothing of AdaLoRA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._backend import Array, check_shape, namespace


@dataclass
class _Moments:
    step: int
    exp_avg: Array
    exp_avg_sq: Array


class AdamW:
    """Functional AdamW over named parameters: `step(params, grads)` returns the new parameters."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0:
            raise ValueError(f"AdamW lr must be >= 0, got {lr}")
        if eps < 0:
            raise ValueError(f"AdamW eps must be >= 0, got {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"AdamW betas[{i}] must be in [0, 1), got {beta}")
        if weight_decay < 0:
            raise ValueError(f"AdamW weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state: dict[str, _Moments] = {}

    def step(self, params: Mapping[str, Array], grads: Mapping[str, Array | None]) -> dict[str, Array]:
        """New values of `params` after one step; names without a gradient (or with None) are unchanged."""
        unknown = sorted(set(grads) - set(params))
        if unknown:
            raise ValueError(f"gradients given for unknown parameters: {unknown}")
        beta1, beta2 = self.betas
        updated = dict(params)
        for name, p in params.items():
            g = grads.get(name)
            if g is None:
                continue
            check_shape(f"gradient of {name}", g, tuple(p.shape))
            xp = namespace(p, g)
            moments = self.state.get(name)
            if moments is None:
                moments = _Moments(0, xp.zeros_like(p), xp.zeros_like(p))
            step = moments.step + 1
            if self.weight_decay != 0:
                p = p * (1 - self.lr * self.weight_decay)
            exp_avg = moments.exp_avg + (1 - beta1) * (g - moments.exp_avg)
            exp_avg_sq = moments.exp_avg_sq * beta2 + (1 - beta2) * g * g
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = xp.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
            updated[name] = p + (-(self.lr / bias_correction1)) * exp_avg / denom
            self.state[name] = _Moments(step, exp_avg, exp_avg_sq)
        return updated
