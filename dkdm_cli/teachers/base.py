"""The Teacher: a frozen denoiser plus the diffusion settings and (for latent teachers) the
autoencoder it needs. Everything the engine and samplers need from a teacher goes through here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dkdm_cli.diffusion.gaussian import GaussianDiffusion
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.models import count_parameters


class Autoencoder(Protocol):
    """What a latent teacher's first stage must offer."""

    scaling_factor: float

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, c, h, w)
        """Images in [-1, 1] to (scaled) latents."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, 3, H, W)
        """(Scaled) latents to images in [-1, 1]."""


@dataclass
class Denoiser:
    """A pretrained diffusion model, ready to take reverse steps: a teacher, or a distilled
    student loaded for sampling (`Teacher` is the same class, the name the API started with).

    `model(x, t_model)` is the raw network; `model_output(x, t)` calls it for process steps t
    (0..T-1), applying the teacher's own timestep convention (e.g. improved-diffusion's
    rescaling of a 4000-step process to 0..1000).
    """

    name: str
    model: nn.Module
    settings: DiffusionSettings
    sample_shape: tuple[int, int, int]  # (C, H, W) of the space the diffusion runs in
    source: str = ""
    autoencoder: Autoencoder | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.diffusion: GaussianDiffusion = self.settings.build()

    # -- the stable API --------------------------------------------------------------------

    @property
    def schedule(self) -> GaussianDiffusion:
        """The teacher's noise process (betas, alphas_cumprod, ...)."""
        return self.diffusion

    @property
    def learn_sigma(self) -> bool:
        """Whether the teacher predicts a variance (2C output channels)."""
        return self.settings.learn_sigma

    @property
    def num_parameters(self) -> int:
        """Parameters of the denoiser."""
        return count_parameters(self.model)

    @property
    def device(self) -> torch.device:
        """Where the denoiser lives."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's parameter dtype (half on CUDA during distillation)."""
        return next(self.model.parameters()).dtype

    def denoise(self, x: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        """The network on original-scale timesteps; float32 out whatever the model's dtype."""
        scaled = model_t.float() * self.settings.timestep_scale if self.settings.timestep_scale != 1 \
            else model_t
        return self.model(x.to(self.dtype), scaled).float()

    @torch.no_grad()
    def model_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Raw output (B, C or 2C, H, W) for states x (B, C, H, W) at process steps t (B,)."""
        return self.denoise(x, self.diffusion.model_timesteps(t))

    @torch.no_grad()
    def reverse_step_distribution(self, x: torch.Tensor, t: torch.Tensor):
        """(mean, log_variance) of p(x_{t-1} | x_t), with the teacher's clipping."""
        step = self.diffusion.p_mean_variance(
            self.model_output(x, t), x_t=x, t=t, clip_denoised=self.settings.clip_denoised
        )
        return step.mean, step.log_variance

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples of the diffusion space to images in [-1, 1] (identity for pixel teachers)."""
        if self.autoencoder is None:
            return x
        with torch.no_grad():
            return self.autoencoder.decode(x)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Denoiser:
        """Move (and optionally cast) the denoiser and autoencoder in place; returns self."""
        self.model.to(device=device, dtype=dtype)
        if isinstance(self.autoencoder, nn.Module):
            self.autoencoder.to(device)
        return self


Teacher = Denoiser  # the public API's name (dkdm_cli.api.load_teacher returns one)


@dataclass(frozen=True)
class TeacherEntry:
    """A registered teacher: how to load it and what `dkdm teachers` shows about it."""

    name: str
    source: str
    description: str
    image_size: int
    channels: int
    parameters: int | None
    load: Callable[..., Teacher]
    is_cached: Callable[[], bool] = lambda: True
    latent: bool = False
    decode_scale: float | None = None  # latent teachers: latents are divided by this to decode
    weights: str = ""  # which weight files are read, where it matters (e.g. a pinned revision)
