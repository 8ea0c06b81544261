"""The Denoiser: a frozen diffusion network plus its diffusion settings and (for latent models)
the autoencoder it needs. Teachers and distilled students are both Denoisers; everything the
engine and samplers need from either goes through here. `Teacher` is the same class under the
name the public API has always used."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from dkdm_cli.diffusion.gaussian import GaussianDiffusion
from dkdm_cli.diffusion.guidance import guided
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import UserError
from dkdm_cli.models import count_parameters
from dkdm_cli.precision import activation_dtype, cast_network
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

    `model(x, t_model)` is the raw network (`model(x, t_model, y)` for a class-conditional one,
    y the labels (B,)); `model_output(x, t[, y])` calls it for process steps t (0..T-1), applying
    the teacher's own timestep convention (e.g. improved-diffusion's rescaling of a 4000-step
    process to 0..1000).

    Class-conditional denoisers have `num_classes` > 0 real classes, 0..num_classes-1, and where
    they were trained with label dropout a `null_class` label (the unconditional branch, for
    classifier-free guidance); both default to what the network says (its `num_classes` and
    `null_class` attributes).
    """

    name: str
    model: nn.Module
    settings: DiffusionSettings
    sample_shape: tuple[int, int, int]  # (C, H, W) of the space the diffusion runs in
    source: str = ""
    autoencoder: Autoencoder | None = None
    info: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None  # real classes (0: unconditional); None: ask the network
    null_class: int | None = None  # the "no class" label, if any; None with num_classes None: ask
    # The sampler a distilled student was made for, e.g. {"name": "consistency", "top": 989};
    # None: any (teachers, DKDM students). `dkdm sample` uses it when no sampler is named.
    sampler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.model.eval().requires_grad_(False)
        self.diffusion: GaussianDiffusion = self.settings.build()
        self._net: Callable[..., torch.Tensor] | None = None  # a compiled forward (`compiled`)
        self._dtype = activation_dtype(self.model)  # read once: not per forward
        if self.num_classes is None:
            self.num_classes = int(getattr(self.model, "num_classes", 0) or 0)
            self.null_class = getattr(self.model, "null_class", None)

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
        """The dtype the network computes in (its inputs are cast to it): float32 unless the
        denoiser was cast by `to(..., dtype=...)` (an execution policy, dkdm_cli/precision.py)."""
        return activation_dtype(self.model)

    @property
    def conditional(self) -> bool:
        """Whether the denoiser takes class labels."""
        return bool(self.num_classes)

    @property
    def label_count(self) -> int:
        """Rows of the label table: the real classes plus the null class, if any."""
        return int(self.num_classes or 0) + (self.null_class is not None)

    def check_labels(self, y: torch.Tensor | None, *, what: str = "class labels") -> None:
        """Refuse labels this denoiser cannot take (a UserError naming the valid range)."""
        if y is None:
            if self.conditional and self.null_class is None:
                raise UserError(f"{self.name} is class-conditional with no null class: give "
                                f"{what} in 0..{self.num_classes - 1}")
            return
        if not self.conditional:
            raise UserError(f"{self.name} is unconditional: it takes no {what}")
        bad = (y < 0) | (y >= self.label_count)
        if bool(bad.any()):
            top = self.label_count - 1
            null = f" ({self.null_class} is the null class)" if self.null_class is not None else ""
            raise UserError(f"{what} must be in 0..{top}{null}, got {int(y[bad][0])}")

    def labels_or_null(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """y, or the null label for every row when y is None (a conditional denoiser)."""
        if y is not None or not self.conditional:
            return y
        if self.null_class is None:
            raise UserError(f"{self.name} is class-conditional with no null class: give class labels")
        return torch.full((batch,), self.null_class, dtype=torch.long, device=device)

    def denoise(self, x: torch.Tensor, model_t: torch.Tensor,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """The network on original-scale timesteps; float32 out whatever the model's dtype.
        A conditional denoiser given no labels runs its null (unconditional) class."""
        scaled = model_t.float() * self.settings.timestep_scale if self.settings.timestep_scale != 1 \
            else model_t
        net = self.model if self._net is None else self._net
        if not self.conditional:
            if y is not None:
                raise UserError(f"{self.name} is unconditional: it takes no class labels")
            return net(x.to(self._dtype), scaled).float()
        y = self.labels_or_null(y, x.shape[0], x.device)
        return net(x.to(self._dtype), scaled, y).float()

    def compiled(self, **options: Any) -> Denoiser:
        """The same denoiser whose network calls go through torch.compile (weights, settings
        and autoencoder shared; `self` stays eager, e.g. for a start-up of changing shapes)."""
        twin = copy.copy(self)
        twin._net = torch.compile(self.model, **options)
        return twin

    def denoise_fn(self, y: torch.Tensor | None = None, *, cfg: float = 1.0):
        """(x, model_t) -> output for the samplers: labels y (B,) bound, classifier-free guidance
        at scale `cfg` (1: none). Unconditional denoisers take neither."""
        if not self.conditional:
            if y is not None or cfg != 1.0:
                raise UserError(f"{self.name} is unconditional: class labels and --cfg do not apply")
            return self.denoise
        if cfg != 1.0 and self.null_class is None:
            raise UserError(f"{self.name} has no null class, so classifier-free guidance "
                            "(--cfg) is not possible; sample with --cfg 1")
        if y is None:  # no labels: the null class, i.e. the unconditional model at any scale
            if self.null_class is None:
                raise UserError(f"{self.name} is class-conditional with no null class: give "
                                f"class labels in 0..{self.num_classes - 1} (--class)")
            return self.denoise
        return guided(self.denoise, y=y, null_class=self.null_class, scale=cfg,
                      channels=self.sample_shape[0])

    @torch.no_grad()
    def model_output(self, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor | None = None) -> torch.Tensor:
        """Raw output (B, C or 2C, H, W) for states x (B, C, H, W) at process steps t (B,)
        (and labels y (B,) for a conditional denoiser)."""
        return self.denoise(x, self.diffusion.model_timesteps(t), y)

    @torch.no_grad()
    def reverse_step_distribution(self, x: torch.Tensor, t: torch.Tensor,
                                  y: torch.Tensor | None = None):
        """(mean, log_variance) of p(x_{t-1} | x_t), with the teacher's clipping."""
        step = self.diffusion.p_mean_variance(
            self.model_output(x, t, y), x_t=x, t=t, clip_denoised=self.settings.clip_denoised
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
            dtype = activation_dtype(self.autoencoder) if isinstance(self.autoencoder, nn.Module) \
                else x.dtype
            return self.autoencoder.decode(x.to(dtype)).float()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Denoiser:
        """Move the denoiser and autoencoder in place, and with `dtype` cast both for inference
        (norm layers of dkdm's models keep float32 parameters: `precision.cast_network`);
        returns self."""
        self.model.to(device=device)
        if dtype is not None:
            cast_network(self.model, dtype)
        if isinstance(self.autoencoder, nn.Module):
            self.autoencoder.to(device)
            if dtype is not None:
                cast_network(self.autoencoder, dtype)
        self._dtype = activation_dtype(self.model)
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
    num_classes: int = 0  # class-conditional teachers: real classes 0..num_classes-1 (0: none)
    null_class: int | None = None  # the "no class" label (classifier-free guidance), if any
    # The license the weights are published under, where dkdm has checked it ("": not known;
    # an export's model card then says to check `source`).
    license: str = ""

    def row(self, *, cached: bool) -> dict[str, Any]:
        """The entry as `dkdm teachers --json` prints it."""
        return {"name": self.name, "source": self.source, "revision": self.revision,
                "description": self.description, "image_size": self.image_size,
                "channels": self.channels, "parameters": self.parameters, "latent": self.latent,
                "weights": self.weights, "decode_scale": self.decode_scale,
                "decode_note": self.decode_note, "num_classes": self.num_classes,
                "null_class": self.null_class, "license": self.license, "cached": cached,
                "recommended": recommended_for(self.name)}
