"""Classifier-free guidance (Ho & Salimans 2022): one combination rule, used for sampling
(`dkdm sample --cfg`) and for guided distillation targets (`distill.guidance_scale`).

The models are passed in as callables; nothing here owns one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (x (B, C, H, W), model_t (B,), y (B,)) -> raw output (B, C or 2C, H, W)
LabelledFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guide(cond: torch.Tensor, uncond: torch.Tensor, *, scale: float, channels: int) -> torch.Tensor:
    """out_u + s (out_c - out_u) on the first `channels` (the eps, x_0 or v prediction, all linear
    in the output); a learned variance (the other channels) comes from the conditional output, as
    DiT samples. s = 1 is the conditional model, s = 0 the unconditional one."""
    pred = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])  # (B, C, H, W)
    return torch.cat([pred, cond[:, channels:]], dim=1)  # (B, C or 2C, H, W)


def guided(fn: LabelledFn, *, y: torch.Tensor, null_class: int | None, scale: float,
           channels: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`fn` with labels y (B,) bound and guidance `scale`: (x, model_t) -> output.

    At scale 1 one forward of B; otherwise ONE forward of 2B (labels y, then the null label) that
    `guide` combines. Rows whose label is already the null class get the unconditional output at
    any scale (cond == uncond there).
    """
    if scale == 1.0:
        return lambda x, t: fn(x, t, y)
    if null_class is None:
        raise ValueError("classifier-free guidance needs a model with a null class")
    null = torch.full_like(y, null_class)  # (B,)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, ...)
        cond, uncond = out.chunk(2)
        return guide(cond, uncond, scale=scale, channels=channels)

    return call
