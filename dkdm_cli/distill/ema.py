"""Exponential moving average of a model's parameters."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `shadow`, a frozen copy of the model whose weights trail the live ones.

    decay_t = min(rate, (1 + n) / (10 + n)) during warm-up (n = updates so far), else rate.
    """

    def __init__(self, model: nn.Module, *, rate: float = 0.9999, warmup: bool = True) -> None:
        self.rate, self.warmup, self.num_updates = rate, warmup, 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple[list, list, nn.Module] | None = None  # (shadow, live params, model)

    def decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.rate
        n = self.num_updates
        return min(self.rate, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * live, for every parameter (one fused kernel)."""
        d = self.decay()
        if self._pairs is None or self._pairs[2] is not model:
            live = [p.detach() for p in model.parameters()]
            shadow = list(self.shadow.parameters())
            if len(live) != len(shadow):
                raise ValueError("EMA shadow and model have different parameters")
            self._pairs = (shadow, live, model)
        torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_buffers(self, model: nn.Module) -> None:
        """Copy the live model's buffers into the shadow. Not per step: dkdm's models hold only
        constant buffers (e.g. DiT's position table); call it before the shadow is saved or used,
        so a model with running statistics would still be right there."""
        for b_shadow, b_live in zip(self.shadow.buffers(), model.buffers(), strict=True):
            b_shadow.copy_(b_live)
