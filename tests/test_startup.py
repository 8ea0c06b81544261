"""Pool start-up (issue 12): stratified start steps, an exact cost count, and states that land on
the right marginals, checked on Gaussian data where the teacher's eps is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dkdm_cli.config import DistillConfig
from dkdm_cli.diffusion.gaussian import GaussianDiffusion, VarianceType, _extract
from dkdm_cli.diffusion.schedules import cosine_betas
from dkdm_cli.distill.pool import (
    StatePool,
    StepAllocation,
    expected_init_steps,
    fill_pool,
    init_pool,
    start_steps,
)

COSINE = GaussianDiffusion(cosine_betas(1000), variance=VarianceType.FIXED_SMALL)


def _gaussian_eps(diffusion: GaussianDiffusion, s2: float):
    """The exact eps-prediction for data N(0, s2 I): E[eps | x_t] = sqrt(1 - a) x_t / (a s2 + 1 - a)."""

    def eps(x, t):
        a = _extract(diffusion.alphas_cumprod, t, x)
        return (1 - a).sqrt() * x / (a * s2 + 1 - a)

    return eps


@pytest.mark.parametrize("size,T", [(7, 20), (20, 20), (45, 20), (1000, 30), (3, 1)])
def test_start_steps_are_stratified_and_random_in_order(size, T):
    t = start_steps(size, num_timesteps=T, generator=torch.Generator().manual_seed(0), device="cpu")
    assert t.shape == (size,) and t.min() >= 0 and t.max() <= T - 1
    assert sorted(t.tolist()) == [((2 * i + 1) * T) // (2 * size) for i in range(size)]
    counts = torch.bincount(t, minlength=T)
    if size >= T:  # every step held, as evenly as possible
        assert counts.min() >= size // T and counts.max() <= -(-size // T)
    else:  # distinct steps
        assert counts.max() == 1
    assert t.tolist() != sorted(t.tolist()) or len(set(t.tolist())) < 3  # in random order
    again = start_steps(size, num_timesteps=T, generator=torch.Generator().manual_seed(1), device="cpu")
    assert sorted(again.tolist()) == sorted(t.tolist())  # the multiset depends only on (N, T)


@pytest.mark.parametrize("init,k", [("fast", 4), ("fast", 30), ("exact", 4)])
@pytest.mark.parametrize("mode,size", [("dynamic", 37), ("dynamic", 8), ("shuffle", 5), ("basic", 6)])
def test_teacher_forwards_equal_expected_init_steps(init, k, mode, size):
    T = 25
    diffusion = GaussianDiffusion(cosine_betas(T), variance=VarianceType.FIXED_SMALL)
    calls = []

    def teacher(x, t):
        calls.append(len(x))
        return _gaussian_eps(diffusion, 0.5)(x, t)

    pool = init_pool(size=size, shape=(1, 2, 2), diffusion=diffusion, teacher_fn=teacher, mode=mode,
                     init=init, init_steps=k, chunk=16, clip_denoised=True, device=torch.device("cpu"),
                     generator=torch.Generator().manual_seed(0))
    expected = expected_init_steps(size=size, num_timesteps=T, init=init, init_steps=k, mode=mode)
    assert sum(calls) == pool.teacher_sample_steps == expected
    if mode != "basic":  # the cost rule, by hand: T-1-t for exact, ceil(k (T-1-t) / (T-1)) for fast
        spans = (T - 1 - pool.t).tolist()
        per_state = spans if init == "exact" else [min(s, math.ceil(k * s / (T - 1))) for s in spans]
        assert expected == sum(per_state)


def _states_at(t_value: int, *, order: int, k: int, s2: float, allocation: StepAllocation,
               n: int = 64, dim: int = 16):
    """States at step t_value brought down from noise z at T-1 by the fast start-up."""
    z = torch.randn(n, 1, 1, dim, generator=torch.Generator().manual_seed(t_value))
    pool = StatePool(z.clone(), torch.full((n,), t_value), num_timesteps=COSINE.num_timesteps,
                     generator=torch.Generator().manual_seed(0))
    fill_pool(pool, diffusion=COSINE, teacher_fn=_gaussian_eps(COSINE, s2), init="fast", init_steps=k,
              chunk=n, clip_denoised=False, order=order, allocation=allocation)
    return z, pool.x


def _variance_error(t_value: int, *, order: int, k: int, s2: float,
                    allocation: StepAllocation = StepAllocation.PROPORTIONAL) -> float:
    """Relative error of the start-up's per-dimension variance at t against a_t s2 + 1 - a_t.

    The teacher is linear, so every state is c * z for one scalar c: the ratio of second moments
    (x over z) is c^2 exactly, without sampling error, and x's variance is c^2 Var(z), Var(z) =
    the marginal at T-1 (which is 1 to within 3e-9)."""
    z, x = _states_at(t_value, order=order, k=k, s2=s2, allocation=allocation)
    ratio = float(x.double().pow(2).mean() / z.double().pow(2).mean())
    a = float(COSINE.alphas_cumprod[t_value])
    a_top = float(COSINE.alphas_cumprod[-1])
    return ratio * (a_top * s2 + 1 - a_top) / (a * s2 + 1 - a) - 1


@pytest.mark.parametrize("s2", [0.25, 1.0])
def test_default_fast_start_up_lands_on_the_marginal(s2):
    d = DistillConfig()
    assert d.init == "fast"
    for t in (50, 150, 400, 800):
        err = _variance_error(t, order=2, k=d.init_steps, s2=s2)
        assert abs(err) < 0.03, (t, err)


def test_old_ddim_start_up_misses_the_marginal():
    """The previous default (8 DDIM jumps) shrinks the spread: the check above catches it."""
    errors = {t: _variance_error(t, order=1, k=8, s2=0.25, allocation=StepAllocation.EQUAL)
              for t in (50, 150, 400, 800)}
    assert errors[50] < -0.2 and errors[150] < -0.1  # 26 % and 16 % short
    assert max(abs(e) for e in errors.values()) > 0.03


def test_fast_start_up_with_one_step_per_jump_is_the_exact_ode_path():
    """With k >= T-1-t every jump is one step; DDIM (order 1) and 2M agree to O(h^2) per step, and
    both reproduce the closed-form probability-flow path x_t = sqrt(v_t / v_{T-1}) z."""
    T = 40
    diffusion = GaussianDiffusion(cosine_betas(T), variance=VarianceType.FIXED_SMALL)
    s2, n = 0.5, 8
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    for order in (1, 2):
        pool = StatePool(z.clone(), torch.full((n,), 5), num_timesteps=T, generator=torch.Generator())
        fill_pool(pool, diffusion=diffusion, teacher_fn=_gaussian_eps(diffusion, s2), init="fast",
                  init_steps=T, chunk=n, clip_denoised=False, order=order)
        assert pool.teacher_sample_steps == n * (T - 1 - 5)
        out[order] = pool.x
    a, a_top = diffusion.alphas_cumprod[5], diffusion.alphas_cumprod[-1]
    exact = z * np.sqrt(float((a * s2 + 1 - a) / (a_top * s2 + 1 - a_top)))
    assert torch.allclose(out[2], exact, rtol=5e-3)
    assert (out[2] - exact).abs().max() < (out[1] - exact).abs().max()  # 2M is the better solver
