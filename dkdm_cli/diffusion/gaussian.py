"""The Gaussian diffusion process maths (DDPM / Improved DDPM / DDIM). No model lives here:
callers pass the model's raw output in, so the same maths serves teachers, students and samplers.

Notation: alpha_bar_t = prod_{s<=t} (1 - beta_s); t runs over 0..T-1 (the paper's t = 1..T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from dkdm_cli.errors import ConfigError


class Prediction(str, Enum):
    """What the model's first C output channels predict."""

    EPSILON = "epsilon"
    SAMPLE = "sample"
    V = "v_prediction"


class VarianceType(str, Enum):
    """How the reverse-step variance is obtained (improved-diffusion's ModelVarType)."""

    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t
    LEARNED_RANGE = "learned_range"  # log-interpolation between the two, from C extra channels
    LEARNED = "learned"  # the extra channels are the log-variance itself

    @property
    def learned(self) -> bool:
        """Whether the model outputs 2C channels."""
        return self in (VarianceType.LEARNED_RANGE, VarianceType.LEARNED)


# The per-step tables a reverse step reads, gathered together (`GaussianDiffusion.coefs`).
COEF_NAMES = (
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
    "posterior_log_variance_clipped", "log_betas", "large_log_variance", "alphas_cumprod",
    "alphas_cumprod_prev",
)


class StepCoefs:
    """Every per-step coefficient of a batch at steps t, each (B, 1, ...) broadcastable against
    the batch, in its dtype and on its device: ONE gather from the process's device table, shared
    by everything computed at those steps (the teacher's reverse step, the student's KL, DDIM)."""

    __slots__ = COEF_NAMES

    def __init__(self, values: torch.Tensor) -> None:  # values (K, B, 1, ...)
        for name, v in zip(COEF_NAMES, values.unbind(0), strict=True):
            setattr(self, name, v)


@dataclass
class ReverseStep:
    """p(x_{t-1} | x_t) and the predictions it was computed from (float32 maths)."""

    mean: torch.Tensor  # (B, C, H, W)
    log_variance: torch.Tensor  # (B, C, H, W), or a broadcast view for fixed variances
    pred_x0: torch.Tensor  # (B, C, H, W), clipped when asked
    x_t: torch.Tensor  # (B, C, H, W) the states the step starts from
    coefs: StepCoefs  # the per-step coefficients at t, reusable by the caller
    model_eps: torch.Tensor | None = None  # the model's eps where it predicts eps, unclipped
    clipped: bool = False

    @property
    def variance(self) -> torch.Tensor:
        """Sigma_t (computed when asked: the loop never needs it)."""
        return torch.exp(self.log_variance)

    @property
    def eps(self) -> torch.Tensor:
        """The eps consistent with pred_x0 (the model's own where nothing was clipped)."""
        if self.model_eps is not None and not self.clipped:
            return self.model_eps
        c = self.coefs
        return (c.sqrt_recip_alphas_cumprod * self.x_t - self.pred_x0) / c.sqrt_recipm1_alphas_cumprod


def _extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] reshaped to broadcast against `like` (B, ...), in like's dtype and device.

    For one-off use (benchmarks, tests); the process's own maths gathers from tables cached on
    the device (`GaussianDiffusion.coefs`). The float64 table is cast on the CPU before it
    moves: Apple GPUs (mps) have no float64.
    """
    table = arr.to(dtype=like.dtype) if arr.dtype != like.dtype else arr  # (T,), on the CPU
    out = table.to(like.device)[t.to(like.device)]  # (B,)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation improved-diffusion uses; kept for identical likelihoods.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to 256 bins (nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(
            x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
        ),
    )
    return log_probs


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion:
    """Closed forms of a discrete Gaussian diffusion with `betas` (float64 internally).

    `timestep_map[i]` is the original timestep that step i of this (possibly respaced) process
    stands for; models are always called with the original timesteps.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        prediction: Prediction = Prediction.EPSILON,
        variance: VarianceType = VarianceType.FIXED_SMALL,
        timestep_map: np.ndarray | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ConfigError("betas must be a 1-D array in (0, 1]")
        self.prediction = Prediction(prediction)
        self.variance = VarianceType(variance)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(
            np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map),
            dtype=torch.long,
        )
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # beta~_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); 0 at t = 0.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log beta~ with the t = 0 entry replaced by t = 1's, so it stays finite.
        post_log_var = np.log(
            np.append(posterior_variance[1], posterior_variance[1:])
            if len(betas) > 1 else np.maximum(posterior_variance, 1e-20)
        )
        large_var = np.append(posterior_variance[1], betas[1:]) if len(betas) > 1 else betas

        def t64(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=torch.float64)

        self.betas = t64(betas)
        self.alphas_cumprod = t64(alphas_cumprod)
        self.alphas_cumprod_prev = t64(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = t64(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = t64(np.sqrt(1.0 - alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = t64(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1_alphas_cumprod = t64(np.sqrt(1.0 / alphas_cumprod - 1))
        self.posterior_variance = t64(posterior_variance)
        self.posterior_log_variance_clipped = t64(post_log_var)
        self.posterior_mean_coef1 = t64(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef2 = t64(
            (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        )
        self.log_betas = t64(np.log(betas))
        self.large_variance = t64(large_var)
        self.large_log_variance = t64(np.log(large_var))
        # Device copies, built once per (device, dtype) and then only indexed: an iteration
        # never casts or copies a table (tests/test_host_sync.py).
        self._coef_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._maps: dict[torch.device, torch.Tensor] = {}

    # -- per-step coefficients --------------------------------------------------------------

    def coef_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(K, T): every table of COEF_NAMES in `dtype` on `device` (cast on the CPU, then moved
        once; cached)."""
        key = (torch.device(device), dtype)
        table = self._coef_tables.get(key)
        if table is None:
            stacked = torch.stack([getattr(self, name) for name in COEF_NAMES])  # (K, T) float64
            table = self._coef_tables[key] = stacked.to(dtype).to(device)
        return table

    def coefs(self, t: torch.Tensor, like: torch.Tensor) -> StepCoefs:
        """The coefficients at steps t (B,) for a batch shaped like `like` (B, ...): one gather."""
        values = self.coef_table(like.device, like.dtype)[:, t]  # (K, B)
        return StepCoefs(values.reshape(len(COEF_NAMES), -1, *([1] * (like.dim() - 1))))

    # -- the forward process q ------------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): (mean, variance, log_var)."""
        c = self.coefs(t, x0)
        var = 1.0 - c.alphas_cumprod
        return c.sqrt_alphas_cumprod * x0, var, torch.log(var)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                 coefs: StepCoefs | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        c = coefs or self.coefs(t, x0)
        return c.sqrt_alphas_cumprod * x0 + c.sqrt_one_minus_alphas_cumprod * noise  # (B, C, H, W)

    def q_posterior_mean(self, *, x0: torch.Tensor, x_t: torch.Tensor, coefs: StepCoefs) -> torch.Tensor:
        """mu~_t(x_t, x_0), the mean of q(x_{t-1} | x_t, x_0)."""
        return coefs.posterior_mean_coef1 * x0 + coefs.posterior_mean_coef2 * x_t

    def q_posterior(self, *, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I): (mean, variance, clipped log-variance)."""
        c = self.coefs(t, x_t)
        var = _extract(self.posterior_variance, t, x_t)
        return self.q_posterior_mean(x0=x0, x_t=x_t, coefs=c), var, c.posterior_log_variance_clipped

    # -- converting between parameterisations ---------------------------------------------

    def x0_from_eps(self, *, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                    coefs: StepCoefs | None = None) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        c = coefs or self.coefs(t, x_t)
        return c.sqrt_recip_alphas_cumprod * x_t - c.sqrt_recipm1_alphas_cumprod * eps

    def eps_from_x0(self, *, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor,
                    coefs: StepCoefs | None = None) -> torch.Tensor:
        """eps = (x_t / sqrt(alpha_bar_t) - x_0) / sqrt(1/alpha_bar_t - 1)."""
        c = coefs or self.coefs(t, x_t)
        return (c.sqrt_recip_alphas_cumprod * x_t - x0) / c.sqrt_recipm1_alphas_cumprod

    def split_output(self, output: torch.Tensor, channels: int):
        """(prediction, variance values or None) from a model output with C or 2C channels."""
        if self.variance.learned:
            if output.shape[1] != 2 * channels:
                raise ConfigError(
                    f"variance type {self.variance.value} needs {2 * channels} output channels, "
                    f"got {output.shape[1]}"
                )
            return output[:, :channels], output[:, channels:]
        if output.shape[1] == 2 * channels:  # a learned-variance model used with a fixed variance
            return output[:, :channels], None
        if output.shape[1] != channels:
            raise ConfigError(f"expected {channels} output channels, got {output.shape[1]}")
        return output, None

    def x0_from_prediction(self, pred: torch.Tensor, *, x_t: torch.Tensor, coefs: StepCoefs):
        """(x_0, the model's eps or None): x_0 implied by the prediction, whatever it
        parameterises; eps only where the model predicts it (it costs nothing then)."""
        if self.prediction is Prediction.EPSILON:
            return self.x0_from_eps(x_t=x_t, t=None, eps=pred, coefs=coefs), pred
        if self.prediction is Prediction.SAMPLE:
            return pred, None
        # v = sqrt(a_bar) eps - sqrt(1 - a_bar) x_0
        return coefs.sqrt_alphas_cumprod * x_t - coefs.sqrt_one_minus_alphas_cumprod * pred, None

    def eps_and_x0(self, pred: torch.Tensor, *, x_t: torch.Tensor, t: torch.Tensor):
        """(eps, x_0) implied by the model's prediction, whatever it parameterises."""
        c = self.coefs(t, x_t)
        x0, eps = self.x0_from_prediction(pred, x_t=x_t, coefs=c)
        if eps is None:
            eps = self.eps_from_x0(x_t=x_t, t=t, x0=x0, coefs=c)
        return eps, x0

    def log_variance(self, var_values: torch.Tensor | None, *, t: torch.Tensor, like: torch.Tensor,
                     coefs: StepCoefs | None = None):
        """log Sigma_t for this variance type (var_values: the model's extra channels)."""
        c = coefs or self.coefs(t, like)
        if self.variance is VarianceType.FIXED_SMALL:
            return c.posterior_log_variance_clipped.expand_as(like)
        if self.variance is VarianceType.FIXED_LARGE:
            return c.large_log_variance.expand_as(like)
        if var_values is None:
            raise ConfigError(f"variance type {self.variance.value} needs the model's variance output")
        if self.variance is VarianceType.LEARNED:
            return var_values
        # Learned range: log Sigma = v log beta_t + (1 - v) log beta~_t with v = (out + 1) / 2.
        frac = (var_values + 1) / 2
        return frac * c.log_betas + (1 - frac) * c.posterior_log_variance_clipped

    # -- the reverse process p -------------------------------------------------------------

    def p_mean_variance(
        self,
        output: torch.Tensor,
        *,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        clip_range: float = 1.0,
        coefs: StepCoefs | None = None,
    ) -> ReverseStep:
        """p(x_{t-1} | x_t) from a model output: mean mu~_t(x_t, x_0_hat) and Sigma_t."""
        pred, var_values = self.split_output(output, x_t.shape[1])
        return self.reverse_step(pred, var_values, x_t=x_t, t=t, clip_denoised=clip_denoised,
                                 clip_range=clip_range, coefs=coefs)

    def reverse_step(
        self,
        pred: torch.Tensor,
        var_values: torch.Tensor | None,
        *,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        clip_range: float = 1.0,
        coefs: StepCoefs | None = None,
    ) -> ReverseStep:
        """p(x_{t-1} | x_t) from the prediction (B, C, H, W) and the variance channels (or None)
        already split; `coefs`: the coefficients at t when the caller has gathered them."""
        c = coefs or self.coefs(t, x_t)
        x0, model_eps = self.x0_from_prediction(pred, x_t=x_t, coefs=c)
        if clip_denoised:
            x0 = x0.clamp(-clip_range, clip_range)
        return ReverseStep(mean=self.q_posterior_mean(x0=x0, x_t=x_t, coefs=c),
                           log_variance=self.log_variance(var_values, t=t, like=x_t, coefs=c),
                           pred_x0=x0, x_t=x_t, coefs=c, model_eps=model_eps, clipped=clip_denoised)

    def ancestral_step(
        self, step: ReverseStep, *, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_{t-1} = mu + Sigma^{1/2} z, with no noise added at t = 0."""
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return step.mean + nonzero * torch.exp(0.5 * step.log_variance) * noise

    def ddim_step(
        self, step: ReverseStep, *, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM (Song et al. eq. 12): x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z."""
        a, a_prev = step.coefs.alphas_cumprod, step.coefs.alphas_cumprod_prev
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        direction = torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * step.eps
        x_prev = torch.sqrt(a_prev) * step.pred_x0 + direction
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return x_prev + nonzero * sigma * noise

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps a model must be called with for this process's steps t."""
        table = self._maps.get(t.device)
        if table is None:  # copied to each device once (a copy on the CPU too: the canonical
            # map is never read in the loop, which tests/test_host_sync.py checks)
            table = self._maps[t.device] = self.timestep_map.to(t.device, copy=True)
        return table[t]

    # -- respacing -------------------------------------------------------------------------

    def respaced(self, use_timesteps) -> GaussianDiffusion:
        """The process restricted to a subset of the original timesteps (improved-diffusion).

        New betas are 1 - alpha_bar_{t_i} / alpha_bar_{t_{i-1}}, so alpha_bar is preserved on
        the kept steps.
        """
        keep = sorted({int(s) for s in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ConfigError(f"respaced timesteps must lie in 0..{self.num_timesteps - 1}")
        acp = self.alphas_cumprod.numpy()
        last = 1.0
        betas = []
        for i in keep:
            betas.append(1 - acp[i] / last)
            last = acp[i]
        base_map = self.timestep_map.numpy()
        return GaussianDiffusion(
            np.asarray(betas), prediction=self.prediction, variance=self.variance,
            timestep_map=base_map[keep],
        )


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Which of T steps to keep. `spec`: N (evenly strided, improved-diffusion's rule),
    "ddimN" (range(0, T, s) with the smallest stride s giving exactly N steps; equal to
    diffusers' "leading" spacing when N divides T), or "a,b,c" (counts per equal section)."""
    spec = str(spec)
    try:
        counts = [int(c) for c in spec.removeprefix("ddim").split(",")]
        if spec.startswith("ddim") and len(counts) != 1:
            raise ValueError(spec)
    except ValueError:
        raise ConfigError(
            f"bad step spec {spec!r}: expected N, ddimN or comma-separated counts like 10,15,20"
        ) from None
    if spec.startswith("ddim"):
        n = counts[0]
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == n:
                return list(range(0, num_timesteps, stride))
        raise ConfigError(f"cannot take exactly {n} DDIM steps of {num_timesteps}")
    if any(c < 1 for c in counts):
        raise ConfigError(f"step counts must be positive, got {spec!r}")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ConfigError(f"cannot take {count} steps from a section of {size} timesteps")
        frac = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac
        start += size
    return sorted(set(kept))
