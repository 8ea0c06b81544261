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

    def decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.rate
        n = self.num_updates
        return min(self.rate, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * live, for every parameter; buffers are copied."""
        d = self.decay()
        live = [p.detach() for p in model.parameters()]
        shadow = list(self.shadow.parameters())
        if len(live) != len(shadow):
            raise ValueError("EMA shadow and model have different parameters")
        # One fused multi-tensor kernel instead of a Python loop over every parameter.
        torch._foreach_lerp_(shadow, live, 1.0 - d)
        for b_shadow, b_live in zip(self.shadow.buffers(), model.buffers(), strict=True):
            b_shadow.copy_(b_live)
        self.num_updates += 1
