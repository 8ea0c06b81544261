"""Training objectives.

`dkdm_loss` is the DKDM objective: L = L_simple* + vlb_weight * L_vlb*, where
  L_simple* = mean || eps_T(x_t, t) - eps_S(x_t, t) ||^2,
  L_vlb*    = KL( p_T(x_{t-1}|x_t) || p_S(x_{t-1}|x_t) ), per timestep, mean over dimensions, in bits,
with the student's eps under stop-gradient inside the KL (so the KL trains only the variance,
as improved-diffusion's hybrid loss does) and the same x_0 clipping on both sides.

Convention for the weight: the paper's lambda = 0.001 multiplies L_vlb = T * E_t[L_t]; we
train on one L_t per sample, so vlb_weight = lambda * T (= 1.0 at T = 1000, which is exactly
improved-diffusion's hybrid-loss weighting).

`hybrid_loss` is the standard data-driven objective (noising real or synthetic x_0), used to
train the built-in teacher and by the `synthetic` baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dkdm_cli.diffusion.gaussian import (
    GaussianDiffusion,
    Prediction,
    ReverseStep,
    _extract,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)


@dataclass
class LossTerms:
    """Per-sample loss terms (B,) and the total (scalar)."""

    loss: torch.Tensor  # per_sample.mean()
    per_sample: torch.Tensor  # (B,) mse + weight * kl
    mse: torch.Tensor  # (B,)
    kl: torch.Tensor | None  # (B,) in bits, unweighted


def vlb_weight(*, lam: float, num_timesteps: int) -> float:
    """Weight of the per-timestep KL (in bits) for the paper's lambda and T."""
    return lam * num_timesteps


def dkdm_loss(
    diffusion: GaussianDiffusion,
    *,
    teacher_out: torch.Tensor,
    student_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    lam: float = 0.001,
    clip_denoised: bool = True,
    teacher_step: ReverseStep | None = None,
) -> LossTerms:
    """The DKDM loss for one batch of chain states x_t (B, C, H, W) at steps t (B,).

    `teacher_step`: p_T(x_{t-1}|x_t) when the caller already computed it from `teacher_out`
    (the engine does, to take the chain step), so it is not computed twice.
    """
    c = x_t.shape[1]
    eps_t, var_t = diffusion.split_output(teacher_out.float(), c)
    student_out = student_out.float()
    eps_s = student_out[:, :c]
    mse = mean_flat((eps_t - eps_s) ** 2)  # (B,)
    use_kl = var_t is not None and student_out.shape[1] == 2 * c
    if not use_kl:
        return LossTerms(loss=mse.mean(), per_sample=mse, mse=mse, kl=None)
    teacher = teacher_step or diffusion.p_mean_variance(teacher_out.float(), x_t=x_t, t=t,
                                                        clip_denoised=clip_denoised)
    frozen = torch.cat([eps_s.detach(), student_out[:, c:]], dim=1)  # stop-gradient on eps_S
    student = diffusion.p_mean_variance(frozen, x_t=x_t, t=t, clip_denoised=clip_denoised)
    kl = mean_flat(
        normal_kl(teacher.mean, teacher.log_variance, student.mean, student.log_variance)
    ) / math.log(2.0)  # (B,) bits
    per_sample = mse + vlb_weight(lam=lam, num_timesteps=diffusion.num_timesteps) * kl
    return LossTerms(loss=per_sample.mean(), per_sample=per_sample, mse=mse, kl=kl)


def prediction_target(diffusion: GaussianDiffusion, *, x0: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """What a model of this prediction type should output at x_t = q_sample(x0, t, noise):
    eps, x_0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0. (B, C, H, W)"""
    if diffusion.prediction is Prediction.EPSILON:
        return noise
    if diffusion.prediction is Prediction.SAMPLE:
        return x0
    a = _extract(diffusion.sqrt_alphas_cumprod, t, x0)
    s = _extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x0)
    return a * noise - s * x0


def hybrid_loss(
    diffusion: GaussianDiffusion,
    *,
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    lam: float = 0.001,
) -> LossTerms:
    """improved-diffusion's L_hybrid = L_simple + lambda * L_vlb on data x0 (B, C, H, W). The
    first C channels are fitted to what the process's prediction type says (eps, x_0 or v)."""
    c = x0.shape[1]
    model_out = model_out.float()
    pred = model_out[:, :c]
    target = prediction_target(diffusion, x0=x0, t=t, noise=noise)
    mse = mean_flat((target - pred) ** 2)  # (B,)
    if model_out.shape[1] != 2 * c:
        return LossTerms(loss=mse.mean(), per_sample=mse, mse=mse, kl=None)
    frozen = torch.cat([pred.detach(), model_out[:, c:]], dim=1)
    p = diffusion.p_mean_variance(frozen, x_t=x_t, t=t, clip_denoised=False)
    true_mean, _, true_log_var = diffusion.q_posterior(x0=x0, x_t=x_t, t=t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
    nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
    ) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)  # the decoder term at t = 0
    per_sample = mse + vlb_weight(lam=lam, num_timesteps=diffusion.num_timesteps) * vb
    return LossTerms(loss=per_sample.mean(), per_sample=per_sample, mse=mse, kl=vb)
