"""Fast ODE solvers from diffusers, for any dkdm denoiser: DPM-Solver++(2M) and UniPC.

These are the baselines a user would pick instead of a few-step student, so they come from the
library users would use (diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler),
configured from the denoiser's own schedule (its exact betas), prediction type and variance
output, and with the denoiser's clipping as diffusers' thresholding at sample_max_value = 1
(which is a plain clip of x_0 to [-1, 1]). Without the clip these solvers give noise on teachers
whose schedule ends at a tiny alpha_bar (the digits teacher's cosine schedule: 2.4e-9), because
their first x_0 estimate amplifies the eps error by 1/sqrt(alpha_bar).

The loop is DDPMPipeline's with the scheduler swapped, so `tests/test_solvers.py` can check it
against diffusers' own pipeline on the same noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion

SOLVERS = ("dpm-solver++", "unipc")


def make_scheduler(kind: str, diffusion: GaussianDiffusion, *, clip_denoised: bool):
    """The diffusers scheduler for `kind` with the process's betas, prediction type and clipping."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    # The variance channels are dropped before the scheduler sees the output (`solve`), so no
    # variance_type: diffusers' own slicing assumes 3 image channels.
    common = dict(num_train_timesteps=diffusion.num_timesteps,
                  trained_betas=diffusion.betas.numpy().tolist(),
                  prediction_type=diffusion.prediction.value, solver_order=2,
                  thresholding=clip_denoised, sample_max_value=1.0)
    if kind == "dpm-solver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **common)
    if kind == "unipc":
        return UniPCMultistepScheduler(**common)
    raise ValueError(f"unknown solver {kind!r}; expected one of {', '.join(SOLVERS)}")


@torch.no_grad()
def solve(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], diffusion: GaussianDiffusion,
          *, noise: torch.Tensor, steps: int, kind: str, clip_denoised: bool,
          on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """x_0 from `noise` (B, C, H, W) in `steps` solver steps; `model(x, model_t)` is the raw
    output (the variance channels, if any, are dropped: these solvers are deterministic)."""
    scheduler = make_scheduler(kind, diffusion, clip_denoised=clip_denoised)
    scheduler.set_timesteps(steps, device=noise.device)
    channels = noise.shape[1]
    x = noise
    timesteps = scheduler.timesteps
    for i, t in enumerate(timesteps):
        model_t = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = model(x, diffusion.model_timesteps(model_t)).to(x.dtype)[:, :channels]
        x = scheduler.step(out, t, x).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return x
