"""The first stage of latent teachers: a diffusers VQModel (vqvae/) or AutoencoderKL (vae/), and
the one decision that makes or breaks every decoded image, the latent scale.

Scaled latents are z * scaling_factor (after subtracting shift_factor where the VAE has one);
the diffusion runs on scaled latents and decoding divides by the factor first. The factor comes
from the component's RAW config.json, not from diffusers' parsed config, because diffusers fills
a missing key with the class default (0.18215 for both classes):
  key present                 -> that value, for either class;
  VQModel, key absent         -> 1.0. LDM's VQ autoencoders (e.g. CompVis/ldm-celebahq-256, whose
                                 vqvae/config.json has no scaling_factor) were trained at scale 1;
                                 dividing by 0.18215 gives diffusers issue 6725's "weird images";
  AutoencoderKL, key absent   -> diffusers' default 0.18215 (the Stable Diffusion VAEs' factor,
                                 which their early configs also omitted), with a warning;
                                 in a DiTPipeline, 0.18215 without a warning: DiT's own factor.
                                 The hub's DiT pipelines were converted when DiTPipeline came
                                 (diffusers #1806, 2023-01-17), before scaling_factor became a
                                 config key (#1860, 2023-01-26), so their vae/config.json may
                                 lack it; that DiTPipeline divided by 0.18215 in code, as DiT's
                                 sample.py does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _console
from dkdm_cli.errors import TeacherError
from dkdm_cli.teachers.diffusers_io import load_component, read_config

AUTOENCODER_FOLDERS = ("vqvae", "vae")
KL_DEFAULT_SCALE = 0.18215  # diffusers' AutoencoderKL default
DIT_SCALE = 0.18215  # DiT's sample.py: vae.decode(samples / 0.18215)


@dataclass(frozen=True)
class LatentScale:
    """The factor latents are multiplied by, the shift subtracted first, and where they came from."""

    scaling_factor: float
    shift_factor: float
    source: str  # "config" | "vqmodel-default" | "diffusers-default" | "dit-default"

    def describe(self) -> str:
        """One phrase for banners and `dkdm teachers`."""
        where = {"config": "from its config",
                 "vqmodel-default": "config has no scaling_factor: LDM VQ autoencoders use 1.0",
                 "diffusers-default": "config has no scaling_factor: diffusers' AutoencoderKL default",
                 "dit-default": "config has no scaling_factor: DiT's 0.18215"}
        shift = f", shift {self.shift_factor:g}" if self.shift_factor else ""
        return f"decode scale {self.scaling_factor:g}{shift} ({where[self.source]})"


def latent_scale(kind: str, raw_config: dict[str, Any], *, pipeline: str | None = None) -> LatentScale:
    """The latent scale for a `kind` ("VQModel" or "AutoencoderKL") from its raw config dict
    (`pipeline`: model_index.json's _class_name, which decides the default for DiT)."""
    shift = float(raw_config.get("shift_factor") or 0.0)
    value = raw_config.get("scaling_factor")
    if value is not None:
        try:
            factor = float(value)
        except (TypeError, ValueError):
            raise TeacherError(f"scaling_factor {value!r} in the {kind} config is not a number") from None
        if not factor > 0:
            raise TeacherError(f"scaling_factor {value!r} in the {kind} config must be positive")
        return LatentScale(factor, shift, "config")
    if kind == "VQModel":
        return LatentScale(1.0, shift, "vqmodel-default")
    if pipeline == "DiTPipeline":
        return LatentScale(DIT_SCALE, shift, "dit-default")
    return LatentScale(KL_DEFAULT_SCALE, shift, "diffusers-default")


class DiffusersAutoencoder(nn.Module):
    """A diffusers VQModel or AutoencoderKL as dkdm's Autoencoder (scaled latents <-> images).

    A VQModel decodes through its quantiser, as LDM's decode_first_stage does; an AutoencoderKL
    encodes to the mean of its posterior (deterministic).
    """

    def __init__(self, vae: nn.Module, *, quantized: bool, scale: LatentScale) -> None:
        super().__init__()
        self.vae = vae
        self.quantized = quantized
        self.scale = scale
        self.scaling_factor = scale.scaling_factor
        self.shift_factor = scale.shift_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] to scaled latents (B, c, h, w)."""
        if self.quantized:
            z = self.vae.encode(images).latents  # (B, c, h, w), before quantisation
        else:
            z = self.vae.encode(images).latent_dist.mode()  # (B, c, h, w)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) to images (B, 3, H, W) clamped to [-1, 1]."""
        z = latents / self.scaling_factor + self.shift_factor  # (B, c, h, w)
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)


def autoencoder_folder(folder: Path) -> Path | None:
    """The component folder of a latent pipeline's first stage, or None (pixel space)."""
    for name in AUTOENCODER_FOLDERS:
        if (Path(folder) / name / "config.json").is_file():
            return Path(folder) / name
    return None


def load_autoencoder(component: Path, *, pipeline: str | None = None) -> DiffusersAutoencoder:
    """The first stage in `component` (a vqvae/ or vae/ folder), with its latent scale
    (`pipeline`: the folder's model_index.json _class_name, if any)."""
    from diffusers import AutoencoderKL, VQModel

    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    raw = read_config(component / "config.json")
    kind = raw.get("_class_name") or ("VQModel" if component.name == "vqvae" else "AutoencoderKL")
    if kind not in classes:
        raise TeacherError(f"{component}: unsupported autoencoder {kind!r} (VQModel or AutoencoderKL)")
    scale = latent_scale(kind, raw, pipeline=pipeline)
    if scale.source == "diffusers-default":
        _console.warn(f"{component}: the AutoencoderKL config has no scaling_factor; using "
                      f"diffusers' default {KL_DEFAULT_SCALE} (Stable Diffusion's)")
    vae = load_component(classes[kind], component, config=raw)
    return DiffusersAutoencoder(vae, quantized=kind == "VQModel", scale=scale).eval()
