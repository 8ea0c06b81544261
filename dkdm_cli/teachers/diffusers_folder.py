"""Teachers in diffusers format: a folder holding a UNet2DModel and a scheduler config, plus, for
latent pipelines (CompVis/ldm-celebahq-256), the VQModel (vqvae/) or AutoencoderKL (vae/) that
turns latents back into images.

Layouts understood (the hub's two conventions):
  folder/model_index.json, unet/, scheduler/scheduler_config.json [, vqvae/ | vae/]
  folder/config.json, folder/scheduler_config.json           (a bare UNet2DModel folder)

Weights: safetensors where a component has them; otherwise `diffusion_pytorch_model.bin` (as
many hub repos, the google/ddpm-* and CompVis/ldm-* families among them, ship), after checking
with `torch.load(weights_only=True)` that it holds nothing but tensors. diffusers' own
`from_pretrained` then builds the model (it renames the old attention keys of early repos).

Latent pipelines: the decode scale is read from the RAW autoencoder config file, not from the
config diffusers fills in. A VQModel whose config has no `scaling_factor` (CompVis/ldm-*: the
VQ-f4 autoencoders were trained unscaled) decodes with scale 1.0; diffusers would fill in 0.18215
and decode garbage (diffusers issue 6725). An AutoencoderKL keeps diffusers' default where the
key is absent. Latents are never clipped to [-1, 1] unless the scheduler config says so.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _console
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import ModelFileError, TeacherError
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.tensorfile import read_tensor_dict

# diffusers' beta_schedule names that are one of our named schedules (same formula).
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
# diffusers' variance_type -> ours. The *_log variants are the same variance computed in log space.
# diffusers' "learned" reads the raw output as a variance (ours: a log-variance), so it is refused.
VARIANCE_TYPES = {
    "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
PREDICTIONS = ("epsilon", "sample", "v_prediction")
AUTOENCODER_FOLDERS = ("vqvae", "vae")
_WEIGHT_STEM = "diffusion_pytorch_model"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Schedulers without a discrete beta schedule (variance-exploding / flow models): not DDPM teachers.
UNSUPPORTED_SCHEDULERS = ("ScoreSdeVeScheduler", "KarrasVeScheduler", "ScoreSdeVpScheduler",
                          "FlowMatchEulerDiscreteScheduler", "CMStochasticIterativeScheduler")


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel behind dkdm's model contract: forward(x, t) -> output tensor."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) on the model's own timestep scale -> (B, C or 2C, H, W)."""
        return self.unet(x, t, return_dict=False)[0]


class DiffusersAutoencoder(nn.Module):
    """A diffusers VQModel or AutoencoderKL as dkdm's Autoencoder (scaled latents <-> images).

    Scaled latents are z * scaling_factor (after subtracting shift_factor where the VAE has one),
    the convention of diffusers' pipelines (LDMPipeline divides by vqvae.config.scaling_factor
    before decoding). A VQModel decodes through its quantiser, as LDM does; an AutoencoderKL
    encodes to the mean of its posterior (deterministic).
    """

    def __init__(self, vae: nn.Module, *, quantized: bool, scaling_factor: float,
                 scale_source: str = "") -> None:
        super().__init__()
        self.vae = vae
        self.quantized = quantized
        self.scaling_factor = float(scaling_factor)
        self.scale_source = scale_source
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] to scaled latents (B, c, h, w)."""
        if self.quantized:
            z = self.vae.encode(images).latents  # (B, c, h, w), before quantisation
        else:
            z = self.vae.encode(images).latent_dist.mode()  # (B, c, h, w)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) to images (B, 3, H, W) clamped to [-1, 1]."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable JSON config ({exc})") from exc


def _unet_dir(folder: Path) -> Path:
    """Where the UNet lives: unet/ when present, else the folder itself."""
    for candidate in (folder / "unet", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise TeacherError(f"{folder}: no UNet found (expected unet/config.json or config.json)")


def _scheduler_config(folder: Path) -> dict[str, Any]:
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return _read_json(path)
    raise TeacherError(
        f"{folder}: no scheduler config (expected scheduler/scheduler_config.json); the teacher's "
        "noise schedule cannot be known without it"
    )


def weights_format(component: Path) -> tuple[bool, str | None]:
    """(use_safetensors, variant) of a component folder: safetensors preferred (the plain file,
    else an fp32 or other variant), else `diffusion_pytorch_model.bin`, checked to be a plain
    tensor dict. Anything else is refused."""
    plain = (f"{_WEIGHT_STEM}.safetensors", f"{_WEIGHT_STEM}.safetensors.index.json")
    if any((component / name).is_file() for name in plain):
        return True, None
    variants = sorted(p.name[len(_WEIGHT_STEM) + 1:-len(".safetensors")]
                      for p in component.glob(f"{_WEIGHT_STEM}.*.safetensors"))
    if variants:
        return True, "fp32" if "fp32" in variants else variants[0]
    binary = component / f"{_WEIGHT_STEM}.bin"
    if binary.is_file():
        read_tensor_dict(binary)  # refuses pickled objects before diffusers reads the file
        return False, None
    others = sorted(p.name for p in component.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    found = f" (found {', '.join(others)})" if others else ""
    raise TeacherError(f"{component}: no {_WEIGHT_STEM}.safetensors or {_WEIGHT_STEM}.bin "
                       f"weights{found}")


def _from_pretrained(cls: type, component: Path) -> nn.Module:
    """diffusers' own loader, local files only, safetensors preferred."""
    use_safetensors, variant = weights_format(component)
    try:
        model = cls.from_pretrained(str(component), use_safetensors=use_safetensors, variant=variant,
                                    local_files_only=True, torch_dtype=torch.float32,
                                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelFileError(f"{component}: diffusers cannot load this {cls.__name__} ({exc})") from exc
    return model.eval().requires_grad_(False)


def settings_from_scheduler(config: dict[str, Any], *, learn_sigma_output: bool,
                            latent: bool = False) -> DiffusionSettings:
    """DiffusionSettings equivalent to a diffusers DDPM/DDIM scheduler config (training process).

    beta_schedule linear | scaled_linear | squaredcos_cap_v2 map to our named schedules (same
    formulas); trained_betas, other schedules and zero-terminal-SNR rescaling become explicit betas
    computed by diffusers itself. A scheduler without variance_type (DDIM) means fixed_small, or
    learned_range when the UNet outputs 2C channels. x_0 is clipped to [-1, 1] as the config's
    `clip_sample` says; where it is absent, only for pixel-space (`latent=False`) teachers.
    """
    if config.get("_class_name") in UNSUPPORTED_SCHEDULERS:
        raise TeacherError(
            f"{config['_class_name']} models are not discrete-time DDPM teachers; dkdm distills "
            "DDPM/DDIM-style (beta schedule) teachers"
        )
    num = int(config.get("num_train_timesteps", 1000))
    name = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    schedule: dict[str, Any]
    if config.get("trained_betas") is not None:
        schedule = {"schedule": "explicit", "betas": tuple(float(b) for b in config["trained_betas"])}
    elif name in SCHEDULE_NAMES and not config.get("rescale_betas_zero_snr", False):
        schedule = {"schedule": SCHEDULE_NAMES[name]}
        if name != "squaredcos_cap_v2":
            schedule.update(beta_start=start, beta_end=end)
    else:
        from diffusers import DDPMScheduler

        try:
            betas = DDPMScheduler(num_train_timesteps=num, beta_start=start, beta_end=end,
                                  beta_schedule=name,
                                  rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr"))).betas
        except (NotImplementedError, ValueError) as exc:
            raise TeacherError(f"unsupported beta_schedule {name!r} in the scheduler config") from exc
        schedule = {"schedule": "explicit", "betas": tuple(float(b) for b in betas.double())}

    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise TeacherError(f"unsupported prediction_type {prediction!r}; expected one of {PREDICTIONS}")
    default_var = "learned_range" if learn_sigma_output else "fixed_small"
    variance_type = config.get("variance_type") or default_var
    if variance_type not in VARIANCE_TYPES:
        raise TeacherError(
            f"unsupported variance_type {variance_type!r}; expected one of {', '.join(VARIANCE_TYPES)}"
        )
    clip = bool(config.get("clip_sample", not latent))
    if latent and clip:
        _console.warn("the scheduler config asks to clip x0 to [-1, 1] on a latent teacher "
                      "(latents are not in [-1, 1]); obeying it as written")
    if config.get("thresholding", False):
        _console.warn("the scheduler uses dynamic thresholding; dkdm clips x0 to [-1, 1] instead")
        clip = True
    elif clip and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise TeacherError(
            f"clip_sample_range {config['clip_sample_range']} is not supported (only 1.0)"
        )
    return DiffusionSettings(num_timesteps=num, prediction=prediction,
                             variance=VARIANCE_TYPES[variance_type], clip_denoised=clip, **schedule)


def _sample_size(config: Any) -> int:
    size = getattr(config, "sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise TeacherError(f"non-square sample_size {tuple(size)} is not supported")
        size = size[0]
    if not size:
        raise TeacherError("the UNet config has no sample_size, so the sample shape is unknown")
    return int(size)


def _load_autoencoder(folder: Path) -> DiffusersAutoencoder | None:
    """The first stage of a latent pipeline, or None for a pixel-space folder."""
    found = [folder / name for name in AUTOENCODER_FOLDERS if (folder / name / "config.json").is_file()]
    component = found[0] if found else None
    if component is None:
        return None
    from diffusers import AutoencoderKL, VQModel

    classes = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}
    kind = _read_json(component / "config.json").get("_class_name") or (
        "VQModel" if component.name == "vqvae" else "AutoencoderKL")
    if kind not in classes:
        raise TeacherError(f"{component}: unsupported autoencoder {kind!r} (VQModel or AutoencoderKL)")
    raw = _read_json(component / "config.json")
    vae = _from_pretrained(classes[kind], component)
    scale, source = decode_scale(raw, kind=kind, filled_in=getattr(vae.config, "scaling_factor", None))
    return DiffusersAutoencoder(vae, quantized=kind == "VQModel", scaling_factor=scale,
                                scale_source=source).eval()


def decode_scale(raw: dict[str, Any], *, kind: str, filled_in: float | None) -> tuple[float, str]:
    """(scale, why) of an autoencoder, from its raw config file: the key where present; absent,
    1.0 for a VQModel (LDM's VQ autoencoders were trained unscaled; diffusers would fill in
    0.18215) and diffusers' default for an AutoencoderKL."""
    if raw.get("scaling_factor") is not None:
        return float(raw["scaling_factor"]), "scaling_factor in the config"
    if kind == "VQModel":
        return 1.0, "no scaling_factor in the VQModel config: unscaled latents"
    return float(filled_in or 0.18215), "no scaling_factor in the config: diffusers' default"


def load_diffusers_teacher(
    folder: Path, *, device: str = "cpu", name: str | None = None, source: str | None = None
) -> Teacher:
    """A teacher from a diffusers folder (see the module docstring for the layouts)."""
    from diffusers import UNet2DModel

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TeacherError(f"{folder}: no such folder")
    unet_dir = _unet_dir(folder)
    unet_config = _read_json(unet_dir / "config.json")
    kind = unet_config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise TeacherError(
            f"{unet_dir}: {kind} is not supported; dkdm distills unconditional UNet2DModel teachers"
        )
    if unet_config.get("time_embedding_type", "positional") != "positional":
        raise TeacherError(f"{unet_dir}: a {unet_config['time_embedding_type']} time embedding "
                           "(score-SDE) is not a discrete-time DDPM teacher")
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise TeacherError(f"{unet_dir}: class-conditional UNets are not supported yet")
    scheduler = _scheduler_config(folder)
    unet = _from_pretrained(UNet2DModel, unet_dir)
    in_ch, out_ch = int(unet.config.in_channels), int(unet.config.out_channels)
    if out_ch not in (in_ch, 2 * in_ch):
        raise TeacherError(f"{unet_dir}: {out_ch} output channels for {in_ch} input channels")
    has_autoencoder = any((folder / n / "config.json").is_file() for n in AUTOENCODER_FOLDERS)
    settings = settings_from_scheduler(scheduler, learn_sigma_output=out_ch == 2 * in_ch,
                                       latent=has_autoencoder)
    if settings.learn_sigma and out_ch != 2 * in_ch:
        raise TeacherError(
            f"{folder}: the scheduler's variance_type {settings.variance} needs {2 * in_ch} output "
            f"channels, the UNet has {out_ch}"
        )
    size = _sample_size(unet.config)
    autoencoder = _load_autoencoder(folder)
    teacher = Teacher(
        name=name or folder.name, model=DiffusersUNet(unet), settings=settings,
        sample_shape=(in_ch, size, size), source=source or str(folder), autoencoder=autoencoder,
        info={"format": "diffusers", "scheduler": scheduler.get("_class_name"),
              "autoencoder": type(autoencoder.vae).__name__ if autoencoder else None,
              "decode_scale": autoencoder.scaling_factor if autoencoder else None,
              "decode_scale_source": autoencoder.scale_source if autoencoder else None},
    )
    return teacher.to(device)
