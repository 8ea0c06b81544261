"""The DKDM objective against a hand computation, and the state pool's bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, Prediction, VarianceType
from dkdm_cli.distill.objective import dkdm_loss, hybrid_loss, training_target, vlb_weight
from dkdm_cli.distill.pool import StatePool, init_pool, pool_size


def _diffusion(T=4):
    betas = np.array([0.1, 0.2, 0.3, 0.4][:T])
    return GaussianDiffusion(betas, prediction=Prediction.EPSILON, variance=VarianceType.LEARNED_RANGE)


def _hand_kl_bits(x, t, teacher, student, betas, clip):
    """Per-sample KL(p_T || p_S) computed from scratch with Python floats (C = H = W = 1)."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log = np.log(np.append(post_var[1], post_var[1:]))

    def mean_logvar(eps, v):
        x0 = (x - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
        if clip:
            x0 = min(1.0, max(-1.0, x0))
        mean = (betas[t] * math.sqrt(abar_prev[t]) / (1 - abar[t])) * x0 + \
            ((1 - abar_prev[t]) * math.sqrt(1 - betas[t]) / (1 - abar[t])) * x
        frac = (v + 1) / 2
        return mean, frac * math.log(betas[t]) + (1 - frac) * post_log[t]

    m1, l1 = mean_logvar(*teacher)
    m2, l2 = mean_logvar(*student)
    kl = 0.5 * (-1 + l2 - l1 + math.exp(l1 - l2) + (m1 - m2) ** 2 * math.exp(-l2))
    return kl / math.log(2)


@pytest.mark.parametrize("clip", [True, False])
def test_dkdm_loss_matches_hand_computation(clip):
    diffusion = _diffusion()
    betas = diffusion.betas.numpy()
    x = torch.tensor([[[[0.3]]], [[[-1.7]]], [[[2.5]]]], dtype=torch.float64)  # (3, 1, 1, 1)
    t = torch.tensor([0, 2, 3])
    teacher = torch.tensor([[0.5, 0.2], [-0.4, -0.9], [1.2, 0.7]], dtype=torch.float64)[..., None, None]
    student = torch.tensor([[0.1, -0.3], [0.2, 0.4], [0.9, -0.1]], dtype=torch.float64)[..., None, None]
    terms = dkdm_loss(diffusion, teacher_out=teacher.float(), student_out=student.float(),
                      x_t=x.float(), t=t, lam=0.001, clip_denoised=clip)
    mse = [(float(a) - float(b)) ** 2 for a, b in zip(teacher[:, 0].flatten(), student[:, 0].flatten(),
                                                       strict=True)]
    kls = [_hand_kl_bits(float(x[i]), int(t[i]), (float(teacher[i, 0]), float(teacher[i, 1])),
                         (float(student[i, 0]), float(student[i, 1])), betas, clip) for i in range(3)]
    assert terms.mse.tolist() == pytest.approx(mse, rel=1e-5)
    assert terms.kl.tolist() == pytest.approx(kls, rel=1e-4, abs=1e-6)
    weight = 0.001 * 4  # lambda * T
    assert vlb_weight(lam=0.001, num_timesteps=4) == weight
    expected = sum(m + weight * k for m, k in zip(mse, kls, strict=True)) / 3
    assert terms.loss.item() == pytest.approx(expected, rel=1e-5)


def test_kl_term_does_not_train_the_students_eps():
    diffusion = _diffusion()
    x = torch.randn(5, 1, 2, 2)
    t = torch.tensor([0, 1, 2, 3, 1])
    teacher = torch.randn(5, 2, 2, 2)
    student = torch.randn(5, 2, 2, 2, requires_grad=True)
    dkdm_loss(diffusion, teacher_out=teacher, student_out=student, x_t=x, t=t).loss.backward()
    # d/d eps_S of mean((eps_T - eps_S)^2) only: the KL reaches the eps channel through nothing.
    expected = 2 * (student[:, :1] - teacher[:, :1]) / (5 * 4)
    assert torch.allclose(student.grad[:, :1], expected.detach(), atol=1e-6)
    assert student.grad[:, 1:].abs().sum() > 0  # the variance channel is trained by the KL


def test_fixed_variance_teacher_gives_mse_only():
    diffusion = GaussianDiffusion(np.array([0.1, 0.2]), variance=VarianceType.FIXED_SMALL)
    terms = dkdm_loss(diffusion, teacher_out=torch.ones(2, 1, 2, 2), student_out=torch.zeros(2, 1, 2, 2),
                      x_t=torch.zeros(2, 1, 2, 2), t=torch.tensor([0, 1]))
    assert terms.kl is None and terms.loss.item() == pytest.approx(1.0)


def test_pool_sizes():
    assert pool_size(mode="dynamic", rho=0.4, num_timesteps=1000, batch_size=128) == 51_200
    assert pool_size(mode="dynamic", rho=0.001, num_timesteps=1000, batch_size=3) == 3
    assert pool_size(mode="basic", rho=0.4, num_timesteps=1000, batch_size=7) == 7


def test_draw_is_distinct_and_write_back_restarts():
    gen = torch.Generator().manual_seed(0)
    pool = StatePool(torch.zeros(10, 1, 2, 2), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
                     num_timesteps=10, generator=gen)
    idx = pool.draw(6)
    assert len(set(idx.tolist())) == 6
    full = pool.draw(10)
    assert full.tolist() == list(range(10))
    t = pool.t[idx].clone()
    pool.write_back(idx, torch.ones(6, 1, 2, 2), t)
    for i, ti in zip(idx.tolist(), t.tolist(), strict=True):
        if ti == 0:
            assert pool.t[i] == 9 and not torch.equal(pool.x[i], torch.ones(1, 2, 2))
        else:
            assert pool.t[i] == ti - 1 and torch.equal(pool.x[i], torch.ones(1, 2, 2))


@pytest.mark.parametrize("init", ["exact", "fast"])
def test_init_reaches_start_steps_at_the_stated_cost(init):
    T, n, k = 12, 40, 3
    diffusion = GaussianDiffusion(np.linspace(0.05, 0.3, T), variance=VarianceType.FIXED_SMALL)
    seen = []

    def teacher_fn(x, t):
        seen.append(t.clone())
        return 0.1 * x  # any smooth eps predictor

    pool = init_pool(size=n, shape=(1, 2, 2), diffusion=diffusion, teacher_fn=teacher_fn, mode="dynamic",
                     init=init, init_steps=k, chunk=16, clip_denoised=True, device=torch.device("cpu"),
                     generator=torch.Generator().manual_seed(1))
    steps_needed = (T - 1 - pool.t).clamp(min=0)
    if init == "exact":
        assert pool.teacher_sample_steps == int(steps_needed.sum())
        # every call is one ancestral step at a single t, from T-1 downwards
        assert all(len(set(s.tolist())) == 1 for s in seen)
    else:
        # ceil(k (T-1-t) / (T-1)) steps each: one step size for every state
        assert pool.teacher_sample_steps == sum(-(-k * s // (T - 1)) for s in steps_needed.tolist())
    assert pool.t.min() >= 0 and pool.t.max() <= T - 1
    assert len(set(pool.t.tolist())) > T // 2  # start steps are spread over 0..T-1
    assert torch.isfinite(pool.x).all()


def test_ema_update_and_warmup():
    from torch import nn

    from dkdm_cli.distill.ema import EMA

    model = nn.Linear(3, 2)
    ema = EMA(model, rate=0.9, warmup=True)
    assert ema.decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0)
    old = [p.detach().clone() for p in ema.shadow.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for s, o, live in zip(ema.shadow.parameters(), old, model.parameters(), strict=True):
        assert torch.allclose(s, 0.1 * o + 0.9 * live)
    for _ in range(200):
        ema.update(model)
    assert ema.decay() == 0.9  # the warm-up ramp is capped at the rate
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_precomputed_teacher_step_gives_the_same_loss():
    diffusion = _diffusion()
    x, t = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 3])
    teacher, student = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    step = diffusion.p_mean_variance(teacher, x_t=x, t=t, clip_denoised=True)
    a = dkdm_loss(diffusion, teacher_out=teacher, student_out=student, x_t=x, t=t)
    b = dkdm_loss(diffusion, teacher_out=teacher, student_out=student, x_t=x, t=t, teacher_step=step)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_sample, b.per_sample)
    assert torch.allclose(a.loss, a.per_sample.mean())


# ---- hybrid_loss fits the prediction type's target (issue 12, 2b) ---------------------------


def _noised(prediction, variance=VarianceType.FIXED_SMALL):
    diffusion = GaussianDiffusion(np.linspace(0.05, 0.4, 6), prediction=prediction, variance=variance)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 2, 3, 3, generator=gen) * 2 - 1  # (B, C, H, W)
    noise = torch.randn(4, 2, 3, 3, generator=gen)
    t = torch.tensor([0, 2, 4, 5])
    return diffusion, x0, noise, t, diffusion.q_sample(x0, t, noise)


@pytest.mark.parametrize("prediction", [Prediction.V, Prediction.SAMPLE])
def test_hybrid_loss_is_zero_only_at_the_prediction_types_target(prediction):
    diffusion, x0, noise, t, x_t = _noised(prediction)
    abar = diffusion.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    # Written out by hand: v = sqrt(abar) eps - sqrt(1 - abar) x0; x0-prediction outputs x0.
    right = abar.sqrt() * noise - (1 - abar).sqrt() * x0 if prediction is Prediction.V else x0
    terms = hybrid_loss(diffusion, model_out=right, x0=x0, x_t=x_t, t=t, noise=noise)
    assert terms.kl is None and terms.mse.abs().max().item() < 1e-12
    # The old behaviour (fit the noise) is now a wrong answer with a clearly non-zero loss.
    wrong = hybrid_loss(diffusion, model_out=noise, x0=x0, x_t=x_t, t=t, noise=noise)
    assert (wrong.mse > 0.01).all()
    # And the target is the one the process decodes back to the true eps and x0.
    eps, x0_back = diffusion.eps_and_x0(right, x_t=x_t, t=t)
    assert torch.allclose(eps, noise, atol=1e-5) and torch.allclose(x0_back, x0, atol=1e-5)


def test_hybrid_loss_for_eps_prediction_is_unchanged():
    diffusion, x0, noise, t, x_t = _noised(Prediction.EPSILON)
    assert hybrid_loss(diffusion, model_out=noise, x0=x0, x_t=x_t, t=t, noise=noise).loss.item() == 0
    assert hybrid_loss(diffusion, model_out=x0, x0=x0, x_t=x_t, t=t, noise=noise).loss.item() > 0.01


@pytest.mark.parametrize("prediction", [Prediction.V, Prediction.SAMPLE])
def test_hybrid_loss_kl_uses_the_prediction_type(prediction):
    """With learned variance, the KL's mean comes from the (stop-gradient) prediction decoded by
    its own type: the exact target and the posterior's own variance give a zero KL for t > 0."""
    diffusion, x0, noise, t, x_t = _noised(prediction, VarianceType.LEARNED_RANGE)
    right = training_target(diffusion, x0=x0, noise=noise, t=t)
    var = -torch.ones_like(right)  # learned range at v = -1: exactly the posterior variance
    out = torch.cat([right, var], dim=1).requires_grad_(True)
    terms = hybrid_loss(diffusion, model_out=out, x0=x0, x_t=x_t, t=t, noise=noise)
    assert terms.mse.abs().max().item() < 1e-12
    assert terms.kl[t > 0].abs().max().item() < 1e-5
    terms.loss.backward()
    assert torch.isfinite(out.grad).all()


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_synthetic_baseline_trains_v_and_x0_teachers(prediction, tmp_path):
    from conftest import make_tiny_teacher_file, tiny_distill_args

    from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint
    from dkdm_cli.cli import run
    from dkdm_cli.diffusion.settings import DiffusionSettings
    from dkdm_cli.models.io import read_model_doc, save_model
    from dkdm_cli.teachers.spec import resolve_teacher

    base = make_tiny_teacher_file(tmp_path / "eps.safetensors", learn_sigma=False)
    teacher = resolve_teacher(str(base))
    settings = DiffusionSettings.from_dict(read_model_doc(base)["diffusion"] | {"prediction": prediction})
    path = tmp_path / f"{prediction}.safetensors"
    save_model(teacher.model, path, extra={"diffusion": settings.to_dict()})
    rd = tmp_path / "run"
    extra = ["--mode", "synthetic", "--set", "distill.synthetic_samples=8",
             "--set", "distill.synthetic_steps=4"]
    assert run(tiny_distill_args(path, rd, iterations=3, extra=extra)) == 0
    ckpt = read_checkpoint(list_checkpoints(rd)[-1])
    assert ckpt.doc["diffusion"]["prediction"] == prediction
