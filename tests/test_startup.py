"""The pool start-up lands on the teacher chain's marginals, at the cost it states.

The toy teacher is exact for Gaussian data x_0 ~ N(0, s^2 I): E[eps | x_t] is linear in x_t and
it outputs the true reverse variance (beta~_t + coef1^2 Var(x_0 | x_t)), so its ancestral chain is
the exact reverse process and the marginal is known in closed form, Var(x_t) = abar s^2 + 1 - abar.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, VarianceType
from dkdm_cli.distill.pool import chain_assignment, chains_cost, init_pool, mean_init_steps

T, S, D = 60, 0.3, 64


def _toy():
    betas = np.linspace(1e-3, 0.12, T)
    diffusion = GaussianDiffusion(betas, variance=VarianceType.LEARNED)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    var_x0 = S**2 * (1 - abar) / (abar * S**2 + 1 - abar)  # Var(x_0 | x_t)
    coef1 = np.sqrt(abar_prev) * betas / (1 - abar)
    log_var = torch.as_tensor(np.log(betas * (1 - abar_prev) / (1 - abar) + coef1**2 * var_x0))
    a_t = torch.as_tensor(abar)

    def teacher_fn(x, t):  # the exact posterior-mean eps and the exact reverse variance
        a = a_t.to(x.dtype)[t].view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() / (a * S**2 + 1 - a) * x
        return torch.cat([eps, log_var.to(x.dtype)[t].view(-1, 1, 1, 1).expand_as(x)], dim=1)

    return diffusion, teacher_fn, a_t


def _pool(init: str, *, size: int = 3000, seed: int = 0, calls: list | None = None):
    diffusion, teacher_fn, _ = _toy()

    def counted(x, t):
        if calls is not None:
            calls.append(len(x))
        return teacher_fn(x, t)

    return init_pool(size=size, shape=(1, 8, 8), diffusion=diffusion, teacher_fn=counted,
                     mode="dynamic", init=init, init_steps=3, chunk=512, clip_denoised=False,
                     device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                     chain_states=10)


def _variance_error(pool, lo: int, hi: int) -> float:
    """Relative error of mean ||x_t||^2 / D against the closed-form marginal, for t in [lo, hi]."""
    _, _, abar = _toy()
    sel = (pool.t >= lo) & (pool.t <= hi)
    x, t = pool.x[sel].double(), pool.t[sel]
    got = x.pow(2).flatten(1).mean(1).mean()
    want = (abar[t] * S**2 + 1 - abar[t]).mean()
    return float(got / want - 1)


@pytest.mark.parametrize("lo,hi", [(2, 12), (20, 30), (40, 50)])
def test_chains_land_on_the_marginal_where_few_ddim_jumps_do_not(lo, hi):
    chains, fast = _pool("chains"), _pool("fast")
    assert abs(_variance_error(chains, lo, hi)) < 0.05
    if lo < 20:  # three deterministic jumps lose the spread at low t
        assert _variance_error(fast, lo, hi) < -0.15


def test_exact_and_chains_agree():
    exact, chains = _pool("exact", size=1500), _pool("chains", size=1500, seed=1)
    for lo, hi in ((2, 20), (21, 40), (41, 58)):
        assert abs(_variance_error(exact, lo, hi) - _variance_error(chains, lo, hi)) < 0.06


@pytest.mark.parametrize("init", ["chains", "exact", "fast"])
def test_start_up_costs_what_it_says(init):
    calls: list[int] = []
    totals: list[int] = []
    diffusion, teacher_fn, _ = _toy()

    def counted(x, t):
        calls.append(len(x))
        return teacher_fn(x, t)

    pool = init_pool(size=400, shape=(1, 2, 2), diffusion=diffusion, teacher_fn=counted,
                     mode="dynamic", init=init, init_steps=3, chunk=64, clip_denoised=False,
                     device=torch.device("cpu"), generator=torch.Generator().manual_seed(3),
                     chain_states=10, on_total=totals.append)
    assert sum(calls) == pool.teacher_sample_steps == totals[0]
    if init == "chains":
        assert totals[0] == chains_cost(pool.t, chain_assignment(pool.t, 10), T)
        assert sum(calls) < 400 * (T - 1) / 2 / 4  # several times cheaper than exact
    expected = mean_init_steps(size=400, num_timesteps=T, init=init, init_steps=3, mode="dynamic",
                               chain_states=10)
    assert sum(calls) == pytest.approx(expected, rel=0.1)


def test_each_chain_spreads_over_the_steps_and_no_state_is_a_copy():
    t = torch.randint(0, 1000, (6400,), generator=torch.Generator().manual_seed(0))
    chain = chain_assignment(t, 25)
    assert int(chain.max()) + 1 == 256
    for c in range(0, 256, 51):
        steps = t[chain == c]
        assert len(steps) == 25 and len(set(steps.tolist())) == 25
        assert steps.min() < 100 and steps.max() > 900
    pool = _pool("chains", size=3000)
    flat = pool.x.flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)
