"""A teacher's diffusion settings as a small frozen dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dkdm_cli.diffusion.gaussian import GaussianDiffusion, Prediction, VarianceType
from dkdm_cli.diffusion.schedules import make_betas
from dkdm_cli.errors import ConfigError


def default_clip(*, latent: bool) -> bool:
    """Whether x0 is clipped to [-1, 1] when a teacher's files do not say: yes for images (which
    live in [-1, 1]; diffusers' DDPMScheduler default), never for latents (an autoencoder's
    latents are not bounded by 1, so clipping them distorts every step)."""
    return not latent


@dataclass(frozen=True)
class DiffusionSettings:
    """Everything that defines a model's noise process and how its output is read."""

    schedule: str = "cosine"
    num_timesteps: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    betas: tuple[float, ...] | None = None  # only for schedule = "explicit"
    prediction: str = Prediction.EPSILON.value
    variance: str = VarianceType.FIXED_SMALL.value
    # Clip predicted x0 to [-1, 1]: right for pixels, wrong for latents (see default_clip).
    clip_denoised: bool = True
    # improved-diffusion's rescale_timesteps: the model is called with t * timestep_scale.
    timestep_scale: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self) -> GaussianDiffusion:
        """The GaussianDiffusion these settings describe."""
        betas = make_betas(self.schedule, self.num_timesteps, beta_start=self.beta_start,
                           beta_end=self.beta_end, betas=self.betas)
        try:
            return GaussianDiffusion(betas, prediction=Prediction(self.prediction),
                                     variance=VarianceType(self.variance))
        except ValueError as exc:
            raise ConfigError(f"bad diffusion settings: {exc}") from exc

    @property
    def learn_sigma(self) -> bool:
        """Whether models with these settings output 2C channels."""
        return VarianceType(self.variance).learned

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        if d["betas"] is not None:
            d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionSettings:
        """Inverse of to_dict; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown diffusion settings: {', '.join(sorted(unknown))}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)
