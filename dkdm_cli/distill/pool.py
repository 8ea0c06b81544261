"""The state pool of dynamic iterative distillation.

N chain states (x_t, t) live on the training device. Each iteration draws b distinct indices
uniformly, the teacher takes ONE reverse step on those states (the same forward gives the loss
target), the student trains on them, and the new states are written back; a state that steps
past t = 0 restarts from fresh N(0, I) noise at t = T-1.

Start-up ("shuffle denoise") gives every state a start step t_i uniform over 0..T-1:
- exact: run the teacher's ancestral chain from T-1 down to t_i (sum_i (T-1-t_i) ~ N*T/2
  teacher sample-steps; the paper's and reference code's method);
- fast: a DDIM (eta = 0) chain from T-1 to t_i in at most k jumps (<= N*k sample-steps).
  A state becomes exact once it has passed through t = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, ReverseStep, _extract
from dkdm_cli.errors import ConfigError

# (x (B, C, H, W), t (B,)) -> raw teacher output (B, C or 2C, H, W), no grad.
TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pool_size(*, mode: str, rho: float, num_timesteps: int, batch_size: int) -> int:
    """N: b for basic/shuffle, ceil(rho * T * b) (at least b) for dynamic."""
    if mode in ("basic", "shuffle"):
        return batch_size
    if mode != "dynamic":
        raise ConfigError(f"no state pool in mode {mode!r}")
    return max(batch_size, math.ceil(rho * num_timesteps * batch_size))


@dataclass
class StepResult:
    """What one teacher step on a batch of states yields."""

    teacher_out: torch.Tensor  # (B, C or 2C, H, W): the loss target
    step: ReverseStep  # p_T(x_{t-1} | x_t), reused by the loss's KL term
    x_next: torch.Tensor  # (B, C, H, W): x_{t-1}


class StatePool:
    """Chain states x (N, C, H, W) at steps t (N,), and the generator that drives them."""

    def __init__(self, x: torch.Tensor, t: torch.Tensor, *, num_timesteps: int,
                 generator: torch.Generator) -> None:
        self.x, self.t = x, t
        self.num_timesteps = num_timesteps
        self.generator = generator
        self.teacher_sample_steps = 0  # teacher sample-steps spent on start-up

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the pool's tensors."""
        return self.x.numel() * self.x.element_size() + self.t.numel() * self.t.element_size()

    def randn(self, shape) -> torch.Tensor:
        """Standard normal noise from the pool's generator, on the pool's device."""
        return torch.randn(shape, generator=self.generator, device=self.x.device, dtype=self.x.dtype)

    def draw(self, batch_size: int) -> torch.Tensor:
        """b distinct indices, uniformly (all of them, in order, when N == b)."""
        n = len(self)
        if batch_size == n:
            return torch.arange(n, device=self.x.device)
        return torch.randperm(n, generator=self.generator, device=self.x.device)[:batch_size]

    def write_back(self, idx: torch.Tensor, x_next: torch.Tensor, t: torch.Tensor) -> None:
        """Store x_{t-1}; states that were at t = 0 restart from fresh noise at T-1."""
        done = t == 0  # (B,)
        fresh = self.randn(x_next.shape)  # drawn every time so the stream does not depend on data
        self.x[idx] = torch.where(done[:, None, None, None], fresh, x_next)
        self.t[idx] = torch.where(done, torch.full_like(t, self.num_timesteps - 1), t - 1)


def teacher_step(teacher_fn: TeacherFn, diffusion: GaussianDiffusion, *, x: torch.Tensor,
                 t: torch.Tensor, noise: torch.Tensor, clip_denoised: bool) -> StepResult:
    """ONE teacher forward on states (x, t): the output (loss target) and x_{t-1}."""
    with torch.no_grad():
        out = teacher_fn(x, t)  # (B, C or 2C, H, W)
        step = diffusion.p_mean_variance(out, x_t=x, t=t, clip_denoised=clip_denoised)
        return StepResult(out, step, diffusion.ancestral_step(step, x_t=x, t=t, noise=noise))


def _exact_chunk(teacher_fn, diffusion, pool: StatePool, idx: torch.Tensor, clip: bool, tick) -> None:
    x = pool.x[idx]  # (n, C, H, W), all at T-1
    target = pool.t[idx]  # (n,)
    cur = diffusion.num_timesteps - 1
    while True:
        active = target < cur  # states still above their start step
        if not bool(active.any()):
            break
        a_idx = active.nonzero().squeeze(1)
        xa = x[a_idx]
        t = torch.full((len(a_idx),), cur, device=x.device, dtype=torch.long)
        x[a_idx] = teacher_step(teacher_fn, diffusion, x=xa, t=t, noise=pool.randn(xa.shape),
                                clip_denoised=clip).x_next
        pool.teacher_sample_steps += len(a_idx)
        tick(len(a_idx))
        cur -= 1
    pool.x[idx] = x


def _fast_chunk(teacher_fn, diffusion, pool: StatePool, idx: torch.Tensor, k: int, clip: bool,
                tick) -> None:
    x = pool.x[idx]  # (n, C, H, W), all at T-1
    target = pool.t[idx]  # (n,)
    top = diffusion.num_timesteps - 1
    jumps = torch.clamp(top - target, max=k)  # (n,) DDIM jumps per state
    span = (top - target).double()
    for j in range(int(jumps.max().item()) if len(jumps) else 0):
        active = (jumps > j).nonzero().squeeze(1)
        ja = jumps[active].double()
        s = (top - torch.round(span[active] * j / ja)).long()  # current step
        s_next = (top - torch.round(span[active] * (j + 1) / ja)).long()  # next step (>= target)
        xa = x[active]
        with torch.no_grad():
            out = teacher_fn(xa, s)
            step = diffusion.p_mean_variance(out, x_t=xa, t=s, clip_denoised=clip)
        abar_next = _extract(diffusion.alphas_cumprod, s_next, xa)
        # DDIM, eta = 0, from step s straight to s_next: x = sqrt(abar') x0 + sqrt(1 - abar') eps.
        x[active] = abar_next.sqrt() * step.pred_x0 + (1 - abar_next).sqrt() * step.eps
        pool.teacher_sample_steps += len(active)
        tick(len(active))
    pool.x[idx] = x


def init_pool(
    *, size: int, shape: tuple[int, int, int], diffusion: GaussianDiffusion, teacher_fn: TeacherFn,
    mode: str, init: str, init_steps: int, chunk: int, clip_denoised: bool, device: torch.device,
    generator: torch.Generator, tick: Callable[[int], None] = lambda n: None,
) -> StatePool:
    """A pool of `size` states: all at T-1 (basic) or shuffled to uniform start steps."""
    T = diffusion.num_timesteps
    x = torch.randn((size, *shape), generator=generator, device=device)  # (N, C, H, W)
    t = torch.full((size,), T - 1, dtype=torch.long, device=device)
    pool = StatePool(x, t, num_timesteps=T, generator=generator)
    if mode == "basic":
        return pool
    pool.t = torch.randint(0, T, (size,), generator=generator, device=device)
    for start in range(0, size, chunk):
        idx = torch.arange(start, min(size, start + chunk), device=device)
        if init == "exact":
            _exact_chunk(teacher_fn, diffusion, pool, idx, clip_denoised, tick)
        else:
            _fast_chunk(teacher_fn, diffusion, pool, idx, init_steps, clip_denoised, tick)
    return pool


def expected_init_steps(*, size: int, num_timesteps: int, init: str, init_steps: int, mode: str) -> int:
    """Approximate teacher sample-steps the start-up will take (for the progress bar)."""
    if mode == "basic":
        return 0
    if init == "exact":
        return size * (num_timesteps - 1) // 2
    return size * min(init_steps, num_timesteps - 1)
