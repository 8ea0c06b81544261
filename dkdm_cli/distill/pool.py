"""The state pool of dynamic iterative distillation.

N chain states (x_t, t) live on the training device. Each iteration draws b distinct indices
uniformly, the teacher takes ONE reverse step on those states (the same forward gives the loss
target), the student trains on them, and the new states are written back; a state that steps
past t = 0 restarts from fresh N(0, I) noise at t = T-1.

Start-up ("shuffle denoise") gives every state a start step t_i uniform over 0..T-1, and must
put x at t_i on the marginal of the teacher's own chain there, q_T(x_t):
- exact: one ancestral chain per state, from T-1 down to t_i (sum_i (T-1-t_i) ~ N*T/2 teacher
  sample-steps; the paper's and reference code's method);
- chains (default): ceil(N/K) ancestral chains, each handing K states to the pool on its way
  down. Every state is a draw of the exact chain at its step, so the marginals are exact; states
  of one chain are correlated with each other (K of N, at start steps spread over 0..T-1, so a
  batch of b rarely holds two). Cost ~ (N/K)*T*(1 - 1/(2K)), K/2 times cheaper than exact;
- fast: a DDIM (eta = 0) chain from T-1 to t_i in at most k jumps (<= N*k sample-steps). Biased:
  few deterministic jumps land short of the marginal's spread (its variance falls short the more
  the lower t is; docs/benchmarks.md), and the bias stays: a state moves one step every
  N/b iterations, so most never reach t = 0 in a run and restart.
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


def chain_assignment(t: torch.Tensor, per_chain: int) -> torch.Tensor:
    """The chain of each state (N,) for the `chains` start-up: states sorted by start step are
    dealt round-robin to ceil(N/K) chains, so each chain's K start steps spread over 0..T-1 and
    two states share a chain (and so could be equal) only if more than N/K share a step."""
    n = len(t)
    chains = max(1, math.ceil(n / per_chain))
    order = torch.argsort(t, stable=True)
    out = torch.empty_like(t)
    out[order] = torch.arange(n, device=t.device) % chains
    return out


def chains_cost(t: torch.Tensor, chain: torch.Tensor, num_timesteps: int) -> int:
    """Teacher sample-steps of the `chains` start-up: each chain runs to its lowest start step."""
    lowest = torch.full((int(chain.max()) + 1,), num_timesteps - 1, dtype=t.dtype, device=t.device)
    lowest = lowest.scatter_reduce(0, chain, t, reduce="amin")
    return int((num_timesteps - 1 - lowest).sum())


def _chains(teacher_fn, diffusion, pool: StatePool, chain: torch.Tensor, first: int, last: int,
            clip: bool, tick) -> None:
    """Run chains first..last-1 from T-1 downwards, copying each into its states on the way."""
    members = ((chain >= first) & (chain < last)).nonzero().squeeze(1)  # pool indices
    local = chain[members] - first  # (n,) chain of each member, 0..last-first-1
    target = pool.t[members]  # (n,)
    lowest = torch.full((last - first,), diffusion.num_timesteps - 1, dtype=target.dtype,
                        device=target.device).scatter_reduce(0, local, target, reduce="amin")
    x = pool.randn((last - first, *pool.x.shape[1:]))  # (M, C, H, W) each chain's x_{T-1}
    cur = diffusion.num_timesteps - 1
    while True:
        hit = target == cur
        pool.x[members[hit]] = x[local[hit]]
        active = (lowest < cur).nonzero().squeeze(1)  # chains with states further down
        if len(active) == 0:
            break
        xa = x[active]
        t = torch.full((len(active),), cur, device=x.device, dtype=torch.long)
        x[active] = teacher_step(teacher_fn, diffusion, x=xa, t=t, noise=pool.randn(xa.shape),
                                 clip_denoised=clip).x_next
        pool.teacher_sample_steps += len(active)
        tick(len(active))
        cur -= 1


def init_pool(
    *, size: int, shape: tuple[int, int, int], diffusion: GaussianDiffusion, teacher_fn: TeacherFn,
    mode: str, init: str, init_steps: int, chunk: int, clip_denoised: bool, device: torch.device,
    generator: torch.Generator, tick: Callable[[int], None] = lambda n: None,
    chain_states: int = 25, on_total: Callable[[int], None] = lambda n: None,
) -> StatePool:
    """A pool of `size` states: all at T-1 (basic) or shuffled to uniform start steps and
    brought there by the `init` start-up. `on_total` is told the exact teacher sample-steps the
    start-up will take before it starts (for a progress bar); `chunk` bounds the states (or
    chains) stepped together."""
    T = diffusion.num_timesteps
    x = torch.randn((size, *shape), generator=generator, device=device)  # (N, C, H, W)
    t = torch.full((size,), T - 1, dtype=torch.long, device=device)
    pool = StatePool(x, t, num_timesteps=T, generator=generator)
    if mode == "basic":
        on_total(0)
        return pool
    pool.t = torch.randint(0, T, (size,), generator=generator, device=device)
    if init in ("chains", "exact"):  # exact: one chain per state
        chain = chain_assignment(pool.t, chain_states if init == "chains" else 1)
        on_total(chains_cost(pool.t, chain, T))
        count = int(chain.max()) + 1
        for first in range(0, count, chunk):
            _chains(teacher_fn, diffusion, pool, chain, first, min(count, first + chunk),
                    clip_denoised, tick)
        return pool
    on_total(int((T - 1 - pool.t).clamp(max=init_steps).sum()))
    for start in range(0, size, chunk):
        idx = torch.arange(start, min(size, start + chunk), device=device)
        _fast_chunk(teacher_fn, diffusion, pool, idx, init_steps, clip_denoised, tick)
    return pool


def mean_init_steps(*, size: int, num_timesteps: int, init: str, init_steps: int, mode: str,
                    chain_states: int = 25) -> float:
    """The expected teacher sample-steps of a start-up (start steps uniform over 0..T-1), for
    planning before the start steps are drawn (e.g. the compute-matched synthetic baseline)."""
    T = num_timesteps
    if mode == "basic":
        return 0.0
    if init == "exact":
        return size * (T - 1) / 2
    if init == "chains":
        chains = max(1, math.ceil(size / chain_states))
        # chain j's lowest start step is about the j-th smallest of N uniform draws
        return sum(T - 1 - (j + 0.5) * T / size for j in range(min(chains, size)))
    return size * sum(min(init_steps, T - 1 - t) for t in range(T)) / T
