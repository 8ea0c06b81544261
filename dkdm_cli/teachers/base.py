"""The Denoiser: a frozen diffusion network plus its diffusion settings and (for latent models)
the autoencoder it needs. Teachers and distilled students are both Denoisers; everything the
engine and samplers need from either goes through here. `Teacher` is the same class under the
name the public API has always used."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dkdm_cli.diffusion.gaussian import GaussianDiffusion
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.models import count_parameters
from dkdm_cli.recommended import recommended_for


class Autoencoder(Protocol):
    """What a latent teacher's first stage must offer."""

    scaling_factor: float

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, c, h, w)
        """Images in [-1, 1] to (scaled) latents."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, c, h, w) -> (B, 3, H, W)
        """(Scaled) latents to images in [-1, 1]."""


@dataclass
class Denoiser:
    """A pretrained diffusion model (a teacher, or a distilled student), ready to take reverse steps.

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

    def space_note(self) -> str | None:
        """How samples become images, for banners: None for pixel space, else the latent space,
        the autoencoder's decode scale and the clipping rule."""
        if self.autoencoder is None:
            return None
        scale = getattr(self.autoencoder, "scale", None)
        how = scale.describe() if scale is not None else \
            f"decode scale {float(self.autoencoder.scaling_factor):g}"
        clip = "x0 clipped to [-1, 1]" if self.settings.clip_denoised else "x0 not clipped"
        kind = type(getattr(self.autoencoder, "vae", self.autoencoder)).__name__
        return f"latent space {'x'.join(map(str, self.sample_shape))} via {kind}: {how}; {clip}"

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


# The public API's name for the class (`load_teacher` returns one; so does `load_student`).
Teacher = Denoiser


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
    revision: str | None = None  # the pinned hub revision, when not the default branch
    weights: str = ""  # which weight files are read, and how
    decode_scale: float | None = None  # latent teachers: what decoded samples are divided by
    decode_note: str = ""  # where decode_scale comes from

    def row(self, *, cached: bool) -> dict[str, Any]:
        """The entry as `dkdm teachers --json` prints it."""
        return {"name": self.name, "source": self.source, "revision": self.revision,
                "description": self.description, "image_size": self.image_size,
                "channels": self.channels, "parameters": self.parameters, "latent": self.latent,
                "weights": self.weights, "decode_scale": self.decode_scale,
                "decode_note": self.decode_note, "cached": cached,
                "recommended": recommended_for(self.name)}
