"""Consistency models on a discrete diffusion process (Song et al. 2023, on DDPM steps as LCM):
the consistency function, the teacher's ODE neighbour, and multistep consistency sampling. No
model lives here: callers pass raw outputs and networks in.

The consistency function of a network that predicts eps (or x_0, or v) is its x_0 estimate,

    f(x_t, t) = clip(x0_hat(x_t, t)),   x0_hat from the prediction through the schedule,

with c_skip = 0 and c_out = 1 at every step t = 0..T-1, and the boundary one step below the grid
(t = -1, clean data), where f is the identity. So a network trained by DKDM is already an
(inaccurate) consistency function and the few-step stage starts from it; and f is exactly what
multistep sampling needs. `clip` is the teacher's x_0 clipping ([-1, 1]; none for latents); in
training its gradient passes straight through (`straight_through_clip`), since a hard clamp
would give no gradient to the pixels that most need it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, StepCoefs
from dkdm_cli.errors import ConfigError

CLEAN = -1  # the step below the grid: clean data, where f(x, -1) = x
SAMPLING_STEPS = 4  # a few-step student's steps when none are asked for (docs/fewstep.md)


def straight_through_clip(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, -1, 1) in the forward pass, the identity's gradient in the backward pass."""
    return x + (x.clamp(-1.0, 1.0) - x).detach()


def consistency_value(diffusion: GaussianDiffusion, output: torch.Tensor, *, x_t: torch.Tensor,
                      coefs: StepCoefs, clip: bool, straight_through: bool = False) -> torch.Tensor:
    """f(x_t, t) (B, C, H, W) from a network's raw output at steps t (their `coefs`)."""
    pred, _ = diffusion.split_output(output, x_t.shape[1])
    x0, _ = diffusion.x0_from_prediction(pred, x_t=x_t, coefs=coefs)
    if not clip:
        return x0
    return straight_through_clip(x0) if straight_through else x0.clamp(-1.0, 1.0)


def renoise(x0: torch.Tensor, eps: torch.Tensor, coefs: StepCoefs) -> torch.Tensor:
    """sqrt(alpha_bar_s) x_0 + sqrt(1 - alpha_bar_s) eps at steps s (their `coefs`): with the
    teacher's x_0 and eps at x_t, the DDIM (eta = 0) step from t to s; with fresh noise, the
    re-noising step of multistep consistency sampling."""
    return coefs.sqrt_alphas_cumprod * x0 + coefs.sqrt_one_minus_alphas_cumprod * eps


def neighbour_steps(t: torch.Tensor, k: int) -> torch.Tensor:
    """t - k (B,), CLEAN where that falls below step 0."""
    tk = t - k
    return torch.where(tk < 0, torch.full_like(tk, CLEAN), tk)


def default_top(num_timesteps: int) -> int:
    """Where multistep sampling starts: 1 % of the steps below T-1. At T-1 the digits teacher's
    alpha_bar is 2.4e-9 and f must map pure noise to an image, the hardest input it has; one
    percent lower the step is still pure noise to the eye (alpha_bar ~1e-4 on a cosine schedule)
    and f is much better there (measured: docs/fewstep.md)."""
    return min(num_timesteps - 1, round(0.99 * num_timesteps))


def ladder(steps: int, *, top: int) -> list[int]:
    """`steps` sampling steps from `top` down, evenly spaced: top, ..., about top / steps."""
    if not 1 <= steps <= top + 1:
        raise ConfigError(f"consistency sampling takes 1 to {top + 1} steps from step {top}, "
                          f"got {steps}")
    return [int(v) for v in np.round(np.linspace(top, 0, steps + 1)[:-1])]


@torch.no_grad()
def consistency_sample(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       diffusion: GaussianDiffusion, *, noise: torch.Tensor, steps: int,
                       top: int | None = None, clip_denoised: bool = True,
                       generator: torch.Generator | None = None,
                       on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Multistep consistency sampling: x_0 = f(x, t_i), re-noised with fresh noise to t_{i+1},
    for the ladder from `top` (default `default_top`); `model(x, model_t)` is the raw output."""
    top = default_top(diffusion.num_timesteps) if top is None else top
    rungs = ladder(steps, top=top)
    x, b = noise, noise.shape[0]
    x0 = noise
    for i, step in enumerate(rungs):
        t = torch.full((b,), step, device=x.device, dtype=torch.long)
        out = model(x, diffusion.model_timesteps(t)).to(x.dtype)
        x0 = consistency_value(diffusion, out, x_t=x, coefs=diffusion.coefs(t, x), clip=clip_denoised)
        if i + 1 < len(rungs):
            s = torch.full((b,), rungs[i + 1], device=x.device, dtype=torch.long)
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = renoise(x0, z, diffusion.coefs(s, x))
        if on_step is not None:
            on_step(i + 1, len(rungs))
    return x0
