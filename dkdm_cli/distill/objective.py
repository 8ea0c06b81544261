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
train the built-in teacher and by the `synthetic` baseline. Its L_simple fits the model's first C
channels to what the process's prediction type names (`training_target`): the noise for eps-,
x_0 for x_0- and v for v-prediction, so a student built with its teacher's prediction type learns
that teacher's parameterisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dkdm_cli.diffusion.gaussian import (
    GaussianDiffusion,
    Prediction,
    ReverseStep,
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
    student_out = student_out.float()  # the loss is float32 whatever the student ran in
    eps_s = student_out[:, :c]
    mse = mean_flat((eps_t - eps_s) ** 2)  # (B,)
    use_kl = var_t is not None and student_out.shape[1] == 2 * c
    if not use_kl:
        return LossTerms(loss=mse.mean(), per_sample=mse, mse=mse, kl=None)
    teacher = teacher_step or diffusion.p_mean_variance(teacher_out.float(), x_t=x_t, t=t,
                                                        clip_denoised=clip_denoised)
    # The student's step at the same t reuses the teacher step's coefficients; its eps enters
    # under stop-gradient, so the KL trains only the variance channels.
    student = diffusion.reverse_step(eps_s.detach(), student_out[:, c:], x_t=x_t, t=t,
                                     clip_denoised=clip_denoised, coefs=teacher.coefs)
    kl = mean_flat(
        normal_kl(teacher.mean, teacher.log_variance, student.mean, student.log_variance)
    ) / math.log(2.0)  # (B,) bits
    per_sample = mse + vlb_weight(lam=lam, num_timesteps=diffusion.num_timesteps) * kl
    return LossTerms(loss=per_sample.mean(), per_sample=per_sample, mse=mse, kl=kl)


def training_target(diffusion: GaussianDiffusion, *, x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> torch.Tensor:
    """What the model's first C channels should output for x_t = q_sample(x0, t, noise) (B, C, H, W).

    eps-prediction: eps; x_0-prediction: x_0; v-prediction: v = sqrt(alpha_bar_t) eps -
    sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022), the inverse of `GaussianDiffusion.eps_and_x0`.
    """
    if diffusion.prediction is Prediction.EPSILON:
        return noise
    if diffusion.prediction is Prediction.SAMPLE:
        return x0
    c = diffusion.coefs(t, x0)  # (B, 1, 1, 1) each
    return c.sqrt_alphas_cumprod * noise - c.sqrt_one_minus_alphas_cumprod * x0  # (B, C, H, W)


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
    """improved-diffusion's L_hybrid = L_simple + lambda * L_vlb on data x0 (B, C, H, W).

    L_simple = mean || target - pred ||^2 with the target of the process's prediction type
    (`training_target`); the KL sees the prediction under stop-gradient, as in `dkdm_loss`.
    """
    c = x0.shape[1]
    model_out = model_out.float()
    pred = model_out[:, :c]  # (B, C, H, W): eps, x_0 or v
    target = training_target(diffusion, x0=x0.float(), noise=noise.float(), t=t)
    mse = mean_flat((target - pred) ** 2)  # (B,)
    if model_out.shape[1] != 2 * c:
        return LossTerms(loss=mse.mean(), per_sample=mse, mse=mse, kl=None)
    p = diffusion.reverse_step(pred.detach(), model_out[:, c:], x_t=x_t, t=t, clip_denoised=False)
    true_mean = diffusion.q_posterior_mean(x0=x0, x_t=x_t, coefs=p.coefs)
    true_log_var = p.coefs.posterior_log_variance_clipped
    kl = mean_flat(normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / math.log(2.0)
    nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=p.mean, log_scales=0.5 * p.log_variance)
    ) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)  # the decoder term at t = 0
    per_sample = mse + vlb_weight(lam=lam, num_timesteps=diffusion.num_timesteps) * vb
    return LossTerms(loss=per_sample.mean(), per_sample=per_sample, mse=mse, kl=vb)
