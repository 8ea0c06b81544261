"""The diffusion maths against diffusers' schedulers and against closed forms worked by hand.

How the comparison with diffusers is made exact: diffusers keeps `alphas_cumprod` in float32, and
its DDPM step recomputes beta_t as 1 - abar_t / abar_{t-1}; at small t that ratio loses about three
significant digits in float32 (a 4e-4 difference at t = 1). That is diffusers' rounding, not a
difference in the maths, so the step tests give diffusers the float64 cumulative product of its
own betas and build our process from the very same betas; both then agree to ~1e-14. One test
compares with the scheduler exactly as shipped (float32), at the timesteps where float32 suffices.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dkdm_cli.diffusion import (
    GaussianDiffusion,
    Prediction,
    VarianceType,
    discretized_gaussian_log_likelihood,
    make_betas,
    normal_kl,
    sample,
    space_timesteps,
)
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import ConfigError

TOL = 1e-5
F64 = torch.float64
T = 1000
SHAPE = (2, 3, 4, 4)  # (B, C, H, W)

# our schedule name -> (diffusers' name, keyword arguments both sides get)
SCHEDULES = {
    "linear": ("linear", {"beta_start": 1e-4, "beta_end": 0.02}),
    "scaled_linear": ("scaled_linear", {"beta_start": 0.0015, "beta_end": 0.0195}),
    "cosine": ("squaredcos_cap_v2", {}),
}


def _exact(scheduler):
    """`scheduler` with its alphas_cumprod in float64 (see the module docstring)."""
    scheduler.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.to(F64), dim=0)
    if hasattr(scheduler, "final_alpha_cumprod"):  # DDIM, set_alpha_to_one=True
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return scheduler


def _ddpm(schedule="cosine", *, variance="fixed_small", prediction="epsilon", clip=True, exact=True):
    name, kw = SCHEDULES[schedule]
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=name, variance_type=variance,
                          prediction_type=prediction, clip_sample=clip, **kw)
    ours = GaussianDiffusion(sched.betas.to(F64).numpy(), prediction=Prediction(prediction),
                             variance=VarianceType(variance))
    return (_exact(sched) if exact else sched), ours


def _inputs(seed: int, *, learned: bool, dtype=F64):
    """x_t (B, C, H, W) and a model output (B, C or 2C, H, W); variance channels in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=dtype)
    out = torch.randn(SHAPE, generator=gen, dtype=dtype)
    if learned:
        frac = torch.rand(SHAPE, generator=gen, dtype=dtype) * 2 - 1
        out = torch.cat([out, frac], dim=1)  # (B, 2C, H, W)
    return x, out


def _tt(t: int) -> torch.Tensor:
    return torch.full((SHAPE[0],), t, dtype=torch.long)


# -- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_schedules_match_diffusers(schedule):
    name, kw = SCHEDULES[schedule]
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=name, **kw)
    betas = make_betas(schedule, T, **kw)
    ours = GaussianDiffusion(betas)
    assert betas.shape == (T,)
    np.testing.assert_allclose(betas, sched.betas.numpy(), rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), sched.alphas_cumprod.numpy(), rtol=0, atol=TOL)
    # relative agreement too, where abar is tiny (cosine's last steps)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), sched.alphas_cumprod.numpy(), rtol=1e-4)


def test_schedule_defaults_are_the_papers():
    np.testing.assert_allclose(make_betas("linear", T)[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(make_betas("scaled_linear", T)[[0, -1]], [0.0015, 0.0195])
    cos = make_betas("cosine", T)
    assert cos.max() == pytest.approx(0.999)  # Improved DDPM clips beta at 0.999
    s = 0.008
    abar = (math.cos((0.5 + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)) ** 2
    assert np.prod(1 - cos[:500]) == pytest.approx(abar, rel=1e-9)


def test_unknown_schedule_and_bad_betas_are_config_errors():
    with pytest.raises(ConfigError, match="unknown noise schedule 'cosin'"):
        make_betas("cosin", 10)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        make_betas("explicit", 2, betas=[0.1, 1.5])
    with pytest.raises(ConfigError, match="needs a list of betas"):
        make_betas("explicit", 2)


# -- one reverse step against diffusers ---------------------------------------------------------


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_diffusers(variance, prediction, clip):
    sched, ours = _ddpm(variance=variance, prediction=prediction, clip=clip)
    learned = VarianceType(variance).learned
    # t = 0 is included: both add no noise there, so the outputs agree although the t = 0
    # log-variance differs (tested separately below).
    for seed, t in enumerate([999, 900, 500, 250, 10, 1, 0]):
        x, out = _inputs(seed, learned=learned)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(100 + seed))
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
        step = ours.p_mean_variance(out, x_t=x, t=_tt(t), clip_denoised=clip)
        x_prev = ours.ancestral_step(step, x_t=x, t=_tt(t), noise=z)  # (B, C, H, W)
        torch.testing.assert_close(x_prev, ref.prev_sample, rtol=0, atol=TOL)
        torch.testing.assert_close(step.pred_x0, ref.pred_original_sample, rtol=0, atol=TOL)
        if t > 0:
            # the variance itself (diffusers returns the log-variance for learned_range)
            var_values = out[:, SHAPE[1]:] if learned else None
            dv = sched._get_variance(t, predicted_variance=var_values)
            mine = step.log_variance if learned else step.variance
            torch.testing.assert_close(mine, torch.as_tensor(dv, dtype=F64).expand_as(mine),
                                       rtol=1e-9, atol=1e-12)


def test_ddpm_step_noise_really_is_added():
    # Guards the test above: with different noise the two must disagree at t > 0.
    sched, ours = _ddpm(variance="fixed_large")
    x, out = _inputs(0, learned=False)
    ref = sched.step(out, 500, x, generator=torch.Generator().manual_seed(1)).prev_sample
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=F64)
    step = ours.p_mean_variance(out, x_t=x, t=_tt(500))
    assert (ours.ancestral_step(step, x_t=x, t=_tt(500), noise=z) - ref).abs().max() > 1e-2


@pytest.mark.parametrize("t", [100, 500, 900])
def test_ddpm_step_matches_diffusers_as_shipped_in_float32(t):
    sched, ours = _ddpm(variance="learned_range", exact=False)
    x, out = _inputs(t, learned=True, dtype=torch.float32)
    ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
    step = ours.p_mean_variance(out, x_t=x, t=_tt(t))
    x_prev = ours.ancestral_step(step, x_t=x, t=_tt(t), noise=z)
    assert x_prev.dtype == torch.float32
    torch.testing.assert_close(x_prev, ref, rtol=0, atol=TOL)


def test_learned_range_log_variance_at_t0_is_clipped_not_1e20():
    # Deliberate difference: at t = 0 beta~_0 = 0, so improved-diffusion (and we) use log beta~_1
    # ("posterior_log_variance_clipped"), while diffusers clamps beta~_0 to 1e-20. No noise is
    # added at t = 0 by either, so samples agree; the KL term at t = 0 would not.
    sched, ours = _ddpm(variance="learned_range")
    x, out = _inputs(0, learned=True)
    step = ours.p_mean_variance(out, x_t=x, t=_tt(0))
    frac = (out[:, 3:] + 1) / 2
    expected = frac * math.log(ours.betas[0]) + (1 - frac) * math.log(ours.posterior_variance[1])
    torch.testing.assert_close(step.log_variance, expected)
    diffusers_logvar = sched._get_variance(0, predicted_variance=out[:, 3:])
    assert (diffusers_logvar - step.log_variance).abs().max() > 1.0


@pytest.mark.parametrize("n", [50, 30, 7])
def test_respaced_ddpm_step_matches_diffusers_set_timesteps(n):
    sched, base = _ddpm("linear", variance="fixed_large", prediction="epsilon", clip=True)
    sched.set_timesteps(n)
    ours = base.respaced(sched.timesteps.tolist())
    assert ours.num_timesteps == n
    for i, t in enumerate(sched.timesteps.tolist()):
        k = n - 1 - i  # our step index for diffusers' i-th timestep
        assert int(ours.model_timesteps(_tt(k))[0]) == t
        x, out = _inputs(i, learned=False)
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i), dtype=F64)
        step = ours.p_mean_variance(out, x_t=x, t=_tt(k))
        torch.testing.assert_close(ours.ancestral_step(step, x_t=x, t=_tt(k), noise=z), ref,
                                   rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [50, 30, 7])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers(n, eta, prediction, clip):
    # With clipping, diffusers' default (use_clipped_model_output=False) keeps the unclipped eps
    # in the "direction pointing to x_t"; we re-derive eps from the clipped x0 as GLIDE and
    # improved-diffusion do, which is diffusers' use_clipped_model_output=True.
    sched = _exact(DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=clip,
                                 prediction_type=prediction, set_alpha_to_one=True))
    sched.set_timesteps(n)
    ours = GaussianDiffusion(sched.betas.to(F64).numpy(), prediction=Prediction(prediction))
    ours = ours.respaced(sched.timesteps.tolist())
    # alpha_prev of the last step is 1 on both sides
    assert float(ours.alphas_cumprod_prev[0]) == 1.0
    for i, t in enumerate(sched.timesteps.tolist()):
        k = n - 1 - i
        assert int(ours.timestep_map[k]) == t
        x, out = _inputs(i, learned=False)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(50 + i), dtype=F64)
        ref = sched.step(out, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
        step = ours.p_mean_variance(out, x_t=x, t=_tt(k), clip_denoised=clip)
        x_prev = ours.ddim_step(step, x_t=x, t=_tt(k), noise=z, eta=eta)
        torch.testing.assert_close(x_prev, ref.prev_sample, rtol=0, atol=TOL)
        torch.testing.assert_close(step.pred_x0, ref.pred_original_sample, rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [10, 20, 50, 100, 250])
def test_ddim_spacing_matches_diffusers_leading_spacing(n):
    # Where n divides T, improved-diffusion's "ddimN" rule and diffusers' "leading" spacing agree.
    # (They differ otherwise: ddim30 of 1000 strides by 34 here, by 33 in diffusers.)
    sched = DDIMScheduler(num_train_timesteps=T)
    sched.set_timesteps(n)
    assert space_timesteps(T, f"ddim{n}") == sorted(sched.timesteps.tolist())


def _toy_model(x, t):
    """A deterministic stand-in denoiser that depends on both x and the timestep."""
    scale = (t.to(x.dtype) / T).reshape(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + scale) - 0.2 * scale  # (B, C, H, W)


def test_ddim_sampling_loop_matches_diffusers():
    sched = _exact(DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=True))
    sched.set_timesteps(25)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = noise
    for t in sched.timesteps:
        out = _toy_model(x, torch.full((SHAPE[0],), int(t)))
        x = sched.step(out, int(t), x, eta=0.0, use_clipped_model_output=True).prev_sample
    seen = []

    def model(x_t, t):
        seen.append(int(t[0]))
        return _toy_model(x_t, t)

    ours = GaussianDiffusion(sched.betas.to(F64).numpy())
    got = sample(model, ours, noise=noise, steps=25, sampler="ddim", eta=0.0)
    assert seen == sched.timesteps.tolist()  # the model is called with the original timesteps
    torch.testing.assert_close(got, x, rtol=0, atol=TOL)


def test_ancestral_sampling_loop_matches_diffusers():
    betas = np.linspace(1e-3, 0.2, 100)
    sched = _exact(DDPMScheduler(num_train_timesteps=100, trained_betas=betas,
                                 variance_type="fixed_small", clip_sample=True))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64)
    gen = torch.Generator().manual_seed(5)
    x = noise
    for t in sched.timesteps:
        x = sched.step(_toy_model(x, torch.full((SHAPE[0],), int(t))), int(t), x,
                       generator=gen).prev_sample
    ours = GaussianDiffusion(sched.betas.to(F64).numpy())
    # We draw one normal per step, t = 0 included (unused there), diffusers only for t > 0:
    # the streams line up because t = 0 is the last step.
    got = sample(_toy_model, ours, noise=noise, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, x, rtol=0, atol=TOL)


# -- closed forms by hand ----------------------------------------------------------------------


def test_normal_kl_equal_gaussians_is_zero():
    mean = torch.randn(5, dtype=F64)
    logvar = torch.randn(5, dtype=F64)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(5, dtype=F64))


def test_normal_kl_matches_hand_computation():
    # KL(N(1, 2) || N(0, 0.5)) = 0.5 * (ln(0.5 / 2) + 2 / 0.5 + (1 - 0)^2 / 0.5 - 1)
    #                          = 0.5 * (-1.3862944 + 4 + 2 - 1) = 1.8068528
    kl = normal_kl(torch.tensor(1.0, dtype=F64), torch.tensor(math.log(2.0), dtype=F64),
                   torch.tensor(0.0, dtype=F64), torch.tensor(math.log(0.5), dtype=F64))
    assert float(kl) == pytest.approx(1.8068528194, abs=1e-9)
    # and it is not symmetric: KL(N(0, 0.5) || N(1, 2)) = 0.5 * (ln 4 + 0.25 + 0.5 - 1)
    back = normal_kl(torch.tensor(0.0, dtype=F64), torch.tensor(math.log(0.5), dtype=F64),
                     torch.tensor(1.0, dtype=F64), torch.tensor(math.log(2.0), dtype=F64))
    assert float(back) == pytest.approx(0.5681471806, abs=1e-9)


def test_posterior_variance_and_coefficients_by_hand():
    g = GaussianDiffusion(np.array([0.1, 0.2, 0.3]))
    # abar = 0.9, 0.72, 0.504; beta~_1 = beta_1 (1 - abar_0) / (1 - abar_1) = 0.2 * 0.1 / 0.28
    np.testing.assert_allclose(g.alphas_cumprod.numpy(), [0.9, 0.72, 0.504])
    np.testing.assert_allclose(g.alphas_cumprod_prev.numpy(), [1.0, 0.9, 0.72])
    assert float(g.posterior_variance[0]) == 0.0
    assert float(g.posterior_variance[1]) == pytest.approx(0.2 * 0.1 / 0.28, rel=1e-12)
    assert float(g.posterior_variance[2]) == pytest.approx(0.3 * 0.28 / 0.496, rel=1e-12)
    # log beta~ at t = 0 is clipped to log beta~_1; fixed_large uses beta~_1 at t = 0 too
    assert float(g.posterior_log_variance_clipped[0]) == pytest.approx(math.log(0.02 / 0.28))
    np.testing.assert_allclose(g.large_log_variance.numpy(), np.log([0.02 / 0.28, 0.2, 0.3]))
    # mu~_t = coef1 x0 + coef2 x_t, DDPM eq. 7
    assert float(g.posterior_mean_coef1[1]) == pytest.approx(math.sqrt(0.9) * 0.2 / 0.28)
    assert float(g.posterior_mean_coef2[1]) == pytest.approx(math.sqrt(0.8) * 0.1 / 0.28)
    mean, var, _ = g.q_posterior(x0=torch.ones(1, 1, dtype=F64), x_t=torch.zeros(1, 1, dtype=F64),
                                 t=torch.tensor([1]))
    assert float(mean) == pytest.approx(math.sqrt(0.9) * 0.2 / 0.28)
    assert float(var) == pytest.approx(0.2 * 0.1 / 0.28)


def test_respaced_betas_keep_alphas_cumprod():
    base = GaussianDiffusion(make_betas("cosine", T))
    keep = space_timesteps(T, "25")
    sub = base.respaced(keep)
    assert sub.num_timesteps == 25
    torch.testing.assert_close(sub.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-9, atol=0)
    assert sub.timestep_map.tolist() == keep
    # respacing a respaced process still maps back to the original timesteps (abar_999 ~ 2e-9 is
    # rebuilt from 1 - beta with beta ~ 1 - 1e-7, hence the looser relative tolerance)
    again = sub.respaced([0, 10, 24])
    assert again.timestep_map.tolist() == [keep[0], keep[10], keep[24]]
    torch.testing.assert_close(again.alphas_cumprod, base.alphas_cumprod[again.timestep_map],
                               rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="0..999"):
        base.respaced([0, 1000])


def test_space_timesteps_improved_diffusion_examples():
    # improved-diffusion's docstring: of 300 steps with "10,15,20", the first 100 steps are
    # strided to 10 steps, the second 100 to 15, the last 100 to 20.
    kept = space_timesteps(300, "10,15,20")
    assert len(kept) == 45
    first, second, third = kept[:10], kept[10:25], kept[25:]
    assert first == list(range(0, 100, 11))  # stride (100 - 1) / (10 - 1) = 11
    assert all(100 <= k < 200 for k in second) and second[0] == 100 and second[-1] == 199
    assert all(200 <= k < 300 for k in third) and third[0] == 200 and third[-1] == 299
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim30") == list(range(0, 1000, 34))
    fifty = space_timesteps(1000, 50)
    assert len(fifty) == 50 and fifty[0] == 0 and fifty[-1] == 999
    assert space_timesteps(4000, "1000") == [round(i * 3999 / 999) for i in range(1000)]
    assert space_timesteps(10, "10") == list(range(10))
    with pytest.raises(ConfigError):
        space_timesteps(10, "11")
    with pytest.raises(ConfigError):
        space_timesteps(1000, "ddim600")  # no stride gives exactly 600 of 1000
    for bad in ("abc", "ddimx", "10,,5", "ddim5,5", "0"):
        with pytest.raises(ConfigError, match="step"):
            space_timesteps(100, bad)


def test_q_sample_mean_and_variance():
    g = GaussianDiffusion(make_betas("linear", T))
    x0 = torch.tensor([[0.5], [-0.8]], dtype=F64)  # (B, 1)
    t = torch.tensor([100, 700])
    mean, var, log_var = g.q_mean_variance(x0, t)
    abar = g.alphas_cumprod[t].reshape(-1, 1)
    torch.testing.assert_close(mean, abar.sqrt() * x0)
    torch.testing.assert_close(var, 1 - abar)
    torch.testing.assert_close(log_var, torch.log(1 - abar))
    noise = torch.randn(2, 200_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    xt = g.q_sample(x0.expand(2, 200_000), t, noise)  # (B, N)
    torch.testing.assert_close(xt, mean + var.sqrt() * noise)
    # the empirical moments, within about 5 standard errors
    assert torch.allclose(xt.mean(1, keepdim=True), mean, atol=5 * (var.sqrt() / 447).max())
    assert torch.allclose(xt.var(1, keepdim=True), var, rtol=0.02)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_x0_eps_round_trip(prediction):
    g = GaussianDiffusion(make_betas("cosine", T), prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=gen, dtype=F64) * 2 - 1
    eps = torch.randn(SHAPE, generator=gen, dtype=F64)
    t = torch.tensor([3, 800])
    x_t = g.q_sample(x0, t, eps)
    torch.testing.assert_close(g.x0_from_eps(x_t=x_t, t=t, eps=eps), x0)
    torch.testing.assert_close(g.eps_from_x0(x_t=x_t, t=t, x0=x0), eps)
    a = g.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    s = g.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {Prediction.EPSILON: eps, Prediction.SAMPLE: x0, Prediction.V: a * eps - s * x0}
    got_eps, got_x0 = g.eps_and_x0(target[prediction], x_t=x_t, t=t)
    torch.testing.assert_close(got_eps, eps)
    torch.testing.assert_close(got_x0, x0)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, math.log(0.1)), (0.3, math.log(0.02)),
                                                 (-0.95, math.log(0.5)), (0.999, math.log(0.004))])
def test_discretized_log_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=F64)  # the 256 8-bit values, (256,)
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale))
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((logp <= 0).all())


def test_discretized_log_likelihood_interior_bin_by_hand():
    # An interior bin's mass is Phi((x + 1/255 - mu)/sigma) - Phi((x - 1/255 - mu)/sigma); the
    # tanh approximation of Phi agrees with erf to about 1e-3.
    x, mu, sigma = 0.2, 0.1, 0.05
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    mass = phi((x + 1 / 255 - mu) / sigma) - phi((x - 1 / 255 - mu) / sigma)
    logp = discretized_gaussian_log_likelihood(torch.tensor([x], dtype=F64),
                                               means=torch.tensor([mu], dtype=F64),
                                               log_scales=torch.tensor([math.log(sigma)], dtype=F64))
    assert math.exp(float(logp)) == pytest.approx(mass, abs=1e-3)


def test_split_output_checks_channels():
    g = GaussianDiffusion(make_betas("linear", 10), variance=VarianceType.LEARNED_RANGE)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ConfigError, match="needs 6 output channels, got 3"):
        g.p_mean_variance(torch.zeros(1, 3, 2, 2), x_t=x, t=torch.tensor([1]))
    fixed = GaussianDiffusion(make_betas("linear", 10))
    # a learned-variance model sampled with a fixed variance: the extra channels are ignored
    out = torch.cat([torch.ones(1, 3, 2, 2), torch.full((1, 3, 2, 2), 9.0)], dim=1)
    a = fixed.p_mean_variance(out, x_t=x, t=torch.tensor([1]))
    b = fixed.p_mean_variance(out[:, :3], x_t=x, t=torch.tensor([1]))
    torch.testing.assert_close(a.mean, b.mean)


def test_diffusion_settings_round_trip_and_build():
    settings = DiffusionSettings(schedule="explicit", num_timesteps=3, betas=(0.1, 0.2, 0.3),
                                 prediction="v_prediction", variance="learned_range",
                                 timestep_scale=0.25, extra={"source": "test"})
    assert DiffusionSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    process = settings.build()
    assert settings.learn_sigma and process.variance is VarianceType.LEARNED_RANGE
    assert process.prediction is Prediction.V
    np.testing.assert_allclose(process.alphas_cumprod.numpy(), [0.9, 0.72, 0.504])
    latent = DiffusionSettings(schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195).build()
    np.testing.assert_allclose(latent.betas.numpy(), make_betas("scaled_linear", 1000))
    with pytest.raises(ConfigError, match="unknown diffusion settings: colour"):
        DiffusionSettings.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="bad diffusion settings"):
        DiffusionSettings(prediction="noise").build()

