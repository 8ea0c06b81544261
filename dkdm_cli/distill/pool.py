"""The state pool of dynamic iterative distillation.

N chain states (x_t, t) live on the training device. Each iteration draws b distinct indices
uniformly, the teacher takes ONE reverse step on those states (the same forward gives the loss
target), the student trains on them, and the new states are written back; a state that steps
past t = 0 restarts from fresh N(0, I) noise at t = T-1.

Start-up ("shuffle denoise") gives the states start steps spread evenly over 0..T-1 (stratified,
in random order) and brings each from N(0, I) at T-1 down to its step:
- exact: the teacher's ancestral chain (sum_i (T-1-t_i) ~ N*T/2 teacher sample-steps; the
  paper's and reference code's method): each state is a draw from the chain's marginal at t_i;
- fast: the probability-flow ODE with DPM-Solver++(2M), ceil(k (T-1-t_i) / (T-1)) teacher steps
  per state (~N*k/2), all of one size ~(T-1)/k. With an exact teacher its states follow the same
  marginals; at k = 48 they are within 1.2 % on Gaussian data at every t >= 20 and within the
  measurement noise of the exact chain on the digits teacher (docs/benchmarks.md). The previous
  fast start-up, 8 DDIM jumps, held the x_0 prediction (a posterior mean) fixed over each long
  jump and so pulled states toward the mean: 26 % too little variance at t = 50 on that data.

Class-conditional teachers: every state also carries a label y, drawn when the state starts
from noise (from `LabelPlan`: a class by the class weights, or the null class with probability
cfg_dropout), kept through its chain, redrawn when it restarts; the teacher steps it with that
label, so each state follows one class's (or the unconditional) chain.

Why the start-up must be right: a state is an exact chain state only after it has passed t = 0
and restarted from noise, and it moves one step every rho*T iterations on average, so a state
starting at t needs about (t + 1) rho T iterations to get there. With the defaults (rho 0.1,
1,500 iterations) that is only states starting below t ~ 15 (about 2 % of the pool); at the
paper's setting (rho 0.4, 200k iterations) states starting above t ~ 500 never restart. For most
of a run the student trains on the start-up's states, stepped by the teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, ReverseStep, _extract
from dkdm_cli.errors import ConfigError

# (x (B, C, H, W), t (B,)[, y (B,)]) -> raw teacher output (B, C or 2C, H, W), no grad; called
# with labels only when the pool has them.
TeacherFn = Callable[..., torch.Tensor]


def _call(teacher_fn: TeacherFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
    return teacher_fn(x, t) if y is None else teacher_fn(x, t, y)


@dataclass(frozen=True)
class LabelPlan:
    """How a state gets its class label: a class drawn by `weights` (K,), replaced by the null
    class with probability `null_prob` (classifier-free guidance's unconditional branch)."""

    weights: tuple[float, ...]  # relative class frequencies, K = number of classes
    null_class: int | None = None
    null_prob: float = 0.0
    # The weights as a tensor per device, made once: the loop draws labels every iteration.
    _probs: dict = field(default_factory=dict, compare=False, repr=False)

    def probabilities(self, device: torch.device) -> torch.Tensor:
        """The class weights (K,) as a float32 tensor on `device` (cached)."""
        probs = self._probs.get(device)
        if probs is None:
            probs = self._probs[device] = torch.tensor(self.weights, dtype=torch.float32).to(device)
        return probs

    def draw(self, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Labels (n,), from `generator`; the same amount of randomness whatever comes out."""
        probs = self.probabilities(device)
        y = torch.multinomial(probs, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long, device=device)  # (n,)
        drop = torch.rand(n, generator=generator, device=device) < self.null_prob  # (n,)
        if self.null_class is None:
            return y
        return torch.where(drop, torch.full_like(y, self.null_class), y)


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
                 generator: torch.Generator, y: torch.Tensor | None = None,
                 labels: LabelPlan | None = None) -> None:
        if (y is None) != (labels is None):
            raise ValueError("a labelled pool needs both its labels and its LabelPlan")
        self.x, self.t, self.y = x, t, y  # y (N,) class labels of a conditional teacher's pool
        self.labels = labels
        self.num_timesteps = num_timesteps
        self.generator = generator
        self.teacher_sample_steps = 0  # teacher sample-steps spent on start-up

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the pool's tensors."""
        return sum(v.numel() * v.element_size() for v in (self.x, self.t, self.y) if v is not None)

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
        """Store x_{t-1}; states that were at t = 0 restart from fresh noise at T-1 (with a fresh
        label, for a conditional teacher)."""
        done = t == 0  # (B,)
        fresh = self.randn(x_next.shape)  # drawn every time so the stream does not depend on data
        self.x[idx] = torch.where(done[:, None, None, None], fresh, x_next)
        self.t[idx] = torch.where(done, torch.full_like(t, self.num_timesteps - 1), t - 1)
        if self.labels is not None:
            fresh_y = self.labels.draw(len(idx), self.generator, self.x.device)  # (B,)
            self.y[idx] = torch.where(done, fresh_y, self.y[idx])


def teacher_step(teacher_fn: TeacherFn, diffusion: GaussianDiffusion, *, x: torch.Tensor,
                 t: torch.Tensor, noise: torch.Tensor, clip_denoised: bool,
                 y: torch.Tensor | None = None) -> StepResult:
    """ONE teacher forward on states (x, t) (labels y): the output (loss target) and x_{t-1}."""
    with torch.no_grad():
        out = _call(teacher_fn, x, t, y)  # (B, C or 2C, H, W)
        step = diffusion.p_mean_variance(out, x_t=x, t=t, clip_denoised=clip_denoised)
        return StepResult(out, step, diffusion.ancestral_step(step, x_t=x, t=t, noise=noise))


def _exact_chunk(teacher_fn, diffusion, pool: StatePool, idx: torch.Tensor, clip: bool, tick) -> None:
    x = pool.x[idx]  # (n, C, H, W), all at T-1
    target = pool.t[idx]  # (n,)
    y = pool.y[idx] if pool.y is not None else None  # (n,)
    cur = diffusion.num_timesteps - 1
    while True:
        active = target < cur  # states still above their start step
        if not bool(active.any()):
            break
        a_idx = active.nonzero().squeeze(1)
        xa = x[a_idx]
        t = torch.full((len(a_idx),), cur, device=x.device, dtype=torch.long)
        x[a_idx] = teacher_step(teacher_fn, diffusion, x=xa, t=t, noise=pool.randn(xa.shape),
                                clip_denoised=clip, y=None if y is None else y[a_idx]).x_next
        pool.teacher_sample_steps += len(a_idx)
        tick(len(a_idx))
        cur -= 1
    pool.x[idx] = x


def start_steps(size: int, *, num_timesteps: int, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Start steps (size,) spread evenly over 0..T-1 (stratified), in random order.

    Stratified rather than i.i.d. uniform: the pool's histogram over t is flat from the start, and
    the multiset of steps depends only on (size, T), so the start-up's cost is known in advance.
    """
    t = _stratified_steps(size, num_timesteps=num_timesteps, device=device)  # (N,)
    return t[torch.randperm(size, generator=generator, device=device)]


def _stratified_steps(size: int, *, num_timesteps: int, device=None) -> torch.Tensor:
    """t_i = floor((i + 1/2) T / N) for i < N, in integer arithmetic: (N,) in 0..T-1, ascending."""
    i = torch.arange(size, device=device, dtype=torch.long)
    return ((2 * i + 1) * num_timesteps) // (2 * size)


def _log_snr_half(diffusion: GaussianDiffusion) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 * log(alpha_bar_t / (1 - alpha_bar_t)), (T,) float64."""
    abar = diffusion.alphas_cumprod
    return 0.5 * (torch.log(abar) - torch.log1p(-abar))


class StepAllocation(str, Enum):
    """How many of the fast start-up's k teacher steps a state starting at t takes."""

    PROPORTIONAL = "proportional"  # ceil(k (T-1-t) / (T-1)): one step size, ~(T-1)/k, for all
    EQUAL = "equal"  # min(k, T-1-t): every state k steps (the previous start-up's rule)


def fast_jumps(span: torch.Tensor, *, k: int, num_timesteps: int,
               allocation: StepAllocation = StepAllocation.PROPORTIONAL) -> torch.Tensor:
    """Teacher steps (N,) the fast start-up takes for states `span` = T-1-t (N,) steps from T-1."""
    if allocation is StepAllocation.EQUAL:
        return span.clamp(max=k)
    top = max(num_timesteps - 1, 1)
    return torch.minimum((span * k + top - 1) // top, span)  # ceil(k span / (T-1)), at most span


def _solver_chunk(teacher_fn, diffusion, pool: StatePool, idx: torch.Tensor, k: int, clip: bool,
                  tick, order: int, allocation: StepAllocation) -> None:
    """Probability-flow ODE from T-1 to each state's start step in `fast_jumps` teacher steps.

    order 2 is DPM-Solver++(2M) (Lu et al. 2022, data prediction, multistep): the x_0 prediction is
    extrapolated linearly in lambda from the previous step's; order 1 is DDIM (eta = 0), which
    holds the posterior mean x_0_hat fixed over each jump and so shrinks the states' spread.
    """
    x = pool.x[idx]  # (n, C, H, W), all at T-1
    y = pool.y[idx] if pool.y is not None else None  # (n,)
    top = diffusion.num_timesteps - 1
    span = top - pool.t[idx]  # (n,)
    jumps = fast_jumps(span, k=k, num_timesteps=top + 1, allocation=allocation)  # (n,) per state
    lam = _log_snr_half(diffusion).to(x.device)  # (T,)
    x0_prev = torch.zeros_like(x)  # (n, C, H, W): previous step's x_0 prediction
    h_prev = torch.zeros(len(idx), dtype=torch.float64, device=x.device)  # (n,)
    for j in range(int(jumps.max().item()) if len(jumps) else 0):
        active = (jumps > j).nonzero().squeeze(1)
        ja, sa = jumps[active], span[active]
        s = top - (sa * j) // ja  # (a,) current step; integer maths, strictly decreasing in j
        s_next = top - (sa * (j + 1)) // ja  # (a,) next step, the start step at j = ja - 1
        xa = x[active]
        with torch.no_grad():
            out = _call(teacher_fn, xa, s, None if y is None else y[active])
            x0 = diffusion.p_mean_variance(out, x_t=xa, t=s, clip_denoised=clip).pred_x0
        h = lam[s_next] - lam[s]  # (a,) step in lambda
        d = x0
        if order == 2 and j > 0:
            # D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i
            w = (h / (2 * h_prev[active])).to(x.dtype).reshape(-1, 1, 1, 1)
            d = (1 + w) * x0 - w * x0_prev[active]
        sigma_ratio = _extract(diffusion.sqrt_one_minus_alphas_cumprod, s_next, xa) / _extract(
            diffusion.sqrt_one_minus_alphas_cumprod, s, xa)
        # x_{s'} = (sigma_{s'} / sigma_s) x_s + alpha_{s'} (1 - e^{-h}) D
        coef = (diffusion.sqrt_alphas_cumprod.to(x.device)[s_next] * -torch.expm1(-h)).to(x.dtype)
        x[active] = sigma_ratio * xa + coef.reshape(-1, 1, 1, 1) * d
        x0_prev[active], h_prev[active] = x0, h
        pool.teacher_sample_steps += len(active)
        tick(len(active))
    pool.x[idx] = x


def fill_pool(pool: StatePool, *, diffusion: GaussianDiffusion, teacher_fn: TeacherFn, init: str,
              init_steps: int, chunk: int, clip_denoised: bool,
              tick: Callable[[int], None] = lambda n: None, order: int = 2,
              allocation: StepAllocation = StepAllocation.PROPORTIONAL) -> None:
    """Bring every state from its noise at T-1 down to its start step `pool.t`, in chunks.

    Fast start-up only: `order` 2 is DPM-Solver++(2M), 1 is DDIM; `allocation` shares out the
    `init_steps`. The defaults are the start-up `init = "fast"` runs; the others are for
    benchmarks (the previous start-up was order 1 with EQUAL allocation).
    """
    if order not in (1, 2):
        raise ConfigError(f"the fast start-up's solver order must be 1 or 2, got {order}")
    size, device = len(pool), pool.x.device
    for start in range(0, size, chunk):
        idx = torch.arange(start, min(size, start + chunk), device=device)
        if init == "exact":
            _exact_chunk(teacher_fn, diffusion, pool, idx, clip_denoised, tick)
        else:
            _solver_chunk(teacher_fn, diffusion, pool, idx, init_steps, clip_denoised, tick, order,
                          allocation)


def init_pool(
    *, size: int, shape: tuple[int, int, int], diffusion: GaussianDiffusion, teacher_fn: TeacherFn,
    mode: str, init: str, init_steps: int, chunk: int, clip_denoised: bool, device: torch.device,
    generator: torch.Generator, tick: Callable[[int], None] = lambda n: None,
    labels: LabelPlan | None = None,
) -> StatePool:
    """A pool of `size` states: all at T-1 (basic) or shuffled to uniform start steps; with
    `labels`, each state also gets a class label (a conditional teacher)."""
    T = diffusion.num_timesteps
    x = torch.randn((size, *shape), generator=generator, device=device)  # (N, C, H, W)
    y = labels.draw(size, generator, device) if labels is not None else None  # (N,)
    t = torch.full((size,), T - 1, dtype=torch.long, device=device)
    pool = StatePool(x, t, num_timesteps=T, generator=generator, y=y, labels=labels)
    if mode == "basic":
        return pool
    pool.t = start_steps(size, num_timesteps=T, generator=generator, device=device)
    fill_pool(pool, diffusion=diffusion, teacher_fn=teacher_fn, init=init, init_steps=init_steps,
              chunk=chunk, clip_denoised=clip_denoised, tick=tick)
    return pool


def expected_init_steps(*, size: int, num_timesteps: int, init: str, init_steps: int, mode: str) -> int:
    """The teacher sample-steps `init_pool` will take, exactly (start steps are stratified)."""
    if mode == "basic":
        return 0
    span = num_timesteps - 1 - _stratified_steps(size, num_timesteps=num_timesteps)  # (N,)
    if init != "exact":
        span = fast_jumps(span, k=init_steps, num_timesteps=num_timesteps)
    return int(span.sum())
