"""Sampling loops. The model is passed in as a callable (x, model_t) -> output; the loop never
owns it, so teachers, students and exported models share one implementation."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, space_timesteps
from dkdm_cli.errors import ConfigError

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler(str, Enum):
    """Which reverse process the sampler runs."""

    IDDPM = "iddpm"  # respaced ancestral sampling (Improved DDPM)
    DDIM = "ddim"
    DPM_SOLVER = "dpm-solver++"  # DPM-Solver++(2M), diffusers' scheduler (diffusion/solvers.py)
    UNIPC = "unipc"  # UniPC, diffusers' scheduler
    CONSISTENCY = "consistency"  # multistep consistency sampling (diffusion/consistency.py)

    @property
    def solver(self) -> bool:
        """A diffusers ODE solver on the full process (not a respaced dkdm chain)."""
        return self in (Sampler.DPM_SOLVER, Sampler.UNIPC)


def check_steps(diffusion: GaussianDiffusion, steps: int | None) -> None:
    """Refuse a number of sampling steps outside 1..T (None: all T)."""
    if steps is not None and not 1 <= steps <= diffusion.num_timesteps:
        raise ConfigError(f"sampling steps must be between 1 and the model's T = "
                          f"{diffusion.num_timesteps}, got {steps}")


def sampling_process(diffusion: GaussianDiffusion, steps: int | None, sampler: Sampler):
    """The (respaced) process a sampler with `steps` steps runs on."""
    check_steps(diffusion, steps)
    if steps is None or steps == diffusion.num_timesteps:
        return diffusion
    spec = f"ddim{steps}" if sampler is Sampler.DDIM else str(steps)
    try:
        kept = space_timesteps(diffusion.num_timesteps, spec)
    except ConfigError:
        kept = space_timesteps(diffusion.num_timesteps, str(steps))
    return diffusion.respaced(kept)


@torch.no_grad()
def sample(
    model: DenoiseFn,
    diffusion: GaussianDiffusion,
    *,
    noise: torch.Tensor,
    steps: int | None = None,
    sampler: Sampler | str = Sampler.IDDPM,
    eta: float = 0.0,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int], None] | None = None,
    top: int | None = None,
) -> torch.Tensor:
    """Run the reverse chain from `noise` (B, C, H, W) to x_0; the same noise and generator give
    the same samples on the same device. `top`: where consistency sampling starts (default
    1 % below T-1)."""
    sampler = Sampler(sampler)
    check_steps(diffusion, steps)
    if sampler is Sampler.CONSISTENCY:
        from dkdm_cli.diffusion.consistency import SAMPLING_STEPS, consistency_sample

        return consistency_sample(model, diffusion, noise=noise, top=top,
                                  steps=SAMPLING_STEPS if steps is None else steps,
                                  clip_denoised=clip_denoised, generator=generator, on_step=on_step)
    if sampler.solver:
        from dkdm_cli.diffusion.solvers import solve

        return solve(model, diffusion, noise=noise, steps=steps or diffusion.num_timesteps,
                     kind=sampler.value, clip_denoised=clip_denoised, on_step=on_step)
    process = sampling_process(diffusion, steps, sampler)
    x = noise
    n = process.num_timesteps
    for i in reversed(range(n)):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = model(x, process.model_timesteps(t)).to(x.dtype)
        step = process.p_mean_variance(out, x_t=x, t=t, clip_denoised=clip_denoised)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if sampler is Sampler.DDIM:
            x = process.ddim_step(step, x_t=x, t=t, noise=z, eta=eta)
        else:
            x = process.ancestral_step(step, x_t=x, t=t, noise=z)
        if on_step is not None:
            on_step(n - i, n)
    return x
