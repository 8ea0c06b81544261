"""Schedules, the Gaussian process maths, respacing and samplers. No models inside."""

from dkdm_cli.diffusion.gaussian import (
    GaussianDiffusion,
    Prediction,
    ReverseStep,
    VarianceType,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    space_timesteps,
)
from dkdm_cli.diffusion.samplers import Sampler, sample
from dkdm_cli.diffusion.schedules import make_betas

__all__ = [
    "GaussianDiffusion", "Prediction", "ReverseStep", "VarianceType", "Sampler",
    "discretized_gaussian_log_likelihood", "make_betas", "mean_flat", "normal_kl", "sample",
    "space_timesteps",
]
