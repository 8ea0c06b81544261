"""Teachers in diffusers format: a folder holding a UNet2DModel (unconditional) or a DiT
(class-conditional, transformer/; teachers/diffusers_dit.py) and a scheduler config, plus, for
latent pipelines (CompVis/ldm-celebahq-256, facebook/DiT-XL-2-256), the VQModel (vqvae/) or
AutoencoderKL (vae/) that turns latents back into images (teachers/autoencoders.py: the latent
scale).

Layouts understood (the hub's conventions):
  folder/model_index.json, unet/, scheduler/scheduler_config.json [, vqvae/ | vae/]
  folder/model_index.json, transformer/, scheduler/, vae/     (DiTPipeline)
  folder/config.json, folder/scheduler_config.json           (a bare UNet2DModel folder; the
                                                              google/ddpm-* repos look like this)

Weights are read by teachers/diffusers_io.py: safetensors preferred, `.bin` read with
torch.load(weights_only=True), every key checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _console
from dkdm_cli.diffusion.settings import DiffusionSettings, default_clip
from dkdm_cli.errors import TeacherError
from dkdm_cli.teachers.autoencoders import LatentScale, autoencoder_folder, latent_scale, load_autoencoder
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.diffusers_dit import dit_config, dit_shapes, is_dit_config, load_dit
from dkdm_cli.teachers.diffusers_io import load_component, read_config, weight_files

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


def _denoiser_dir(folder: Path) -> Path:
    """Where the denoiser lives: unet/ or transformer/ when present, else the folder itself."""
    for candidate in (folder / "unet", folder / "transformer", folder):
        if (candidate / "config.json").is_file():
            return candidate
    raise TeacherError(f"{folder}: no denoiser found (expected unet/config.json, "
                       "transformer/config.json or config.json)")


def _pipeline_class(folder: Path) -> str | None:
    """model_index.json's _class_name (e.g. DiTPipeline), when the folder has one."""
    index = folder / "model_index.json"
    return read_config(index).get("_class_name") if index.is_file() else None


def _scheduler_config(folder: Path) -> dict[str, Any]:
    for path in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if path.is_file():
            return read_config(path)
    raise TeacherError(
        f"{folder}: no scheduler config (expected scheduler/scheduler_config.json); the teacher's "
        "noise schedule cannot be known without it"
    )


def settings_from_scheduler(config: dict[str, Any], *, learn_sigma_output: bool,
                            latent: bool = False) -> DiffusionSettings:
    """DiffusionSettings equivalent to a diffusers DDPM/DDIM scheduler config (training process).

    beta_schedule linear | scaled_linear | squaredcos_cap_v2 map to our named schedules (same
    formulas); trained_betas, other schedules and zero-terminal-SNR rescaling become explicit betas
    computed by diffusers itself. A scheduler without variance_type (DDIM) means fixed_small, or
    learned_range when the UNet outputs 2C channels. Without clip_sample, x0 is clipped to
    [-1, 1] in pixel space (diffusers' DDPMScheduler default) and never for latent teachers
    (latents are not in [-1, 1]); an explicit clip_sample is obeyed, with a warning in latent space.
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
    clip = bool(config.get("clip_sample", default_clip(latent=latent)))
    if latent and clip:
        _console.warn("the scheduler config of this latent teacher asks for clip_sample: x0 "
                      "(a latent) will be clipped to [-1, 1] as it says, which latent models "
                      "rarely want")
    if config.get("thresholding", False):
        _console.warn("the scheduler uses dynamic thresholding; dkdm clips x0 to [-1, 1] instead")
        clip = True
    elif clip and float(config.get("clip_sample_range", 1.0)) != 1.0:
        raise TeacherError(
            f"clip_sample_range {config['clip_sample_range']} is not supported (only 1.0)"
        )
    return DiffusionSettings(num_timesteps=num, prediction=prediction,
                             variance=VARIANCE_TYPES[variance_type], clip_denoised=clip, **schedule)


def _sample_size(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise TeacherError(f"non-square sample_size {tuple(size)} is not supported")
        size = size[0]
    if not size:
        raise TeacherError("the UNet config has no sample_size, so the sample shape is unknown")
    return int(size)


@dataclass(frozen=True)
class FolderPlan:
    """What a diffusers folder's configs say, before any weight is read."""

    kind: str  # "unet" (UNet2DModel) | "dit" (DiT transformer, class-conditional)
    denoiser_dir: Path
    denoiser_config: dict[str, Any]
    scheduler: dict[str, Any]
    settings: DiffusionSettings
    sample_shape: tuple[int, int, int]  # (C, H, W) of the space the diffusion runs in
    autoencoder_dir: Path | None
    latent_scale: LatentScale | None
    pipeline: str | None = None  # model_index.json's _class_name
    num_classes: int = 0  # DiT: num_embeds_ada_norm


def _unet_shapes(unet_dir: Path, config: dict[str, Any]) -> tuple[int, int, int]:
    """(in_channels, out_channels, sample_size) of a UNet2DModel config, checked."""
    kind = config.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise TeacherError(f"{unet_dir}: {kind} is not supported; dkdm distills UNet2DModel and "
                           "DiT (DiTTransformer2DModel) teachers")
    if config.get("time_embedding_type", "positional") != "positional":
        raise TeacherError(f"{unet_dir}: a {config['time_embedding_type']} time embedding "
                           "(score-SDE) is not a discrete-time DDPM teacher")
    if config.get("num_class_embeds") or config.get("class_embed_type"):
        raise TeacherError(f"{unet_dir}: class-conditional UNet2DModels are not supported yet "
                           "(class-conditional DiT pipelines are)")
    # UNet2DModel's own defaults where the config is silent (in 3, out 3).
    in_ch, out_ch = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    if out_ch not in (in_ch, 2 * in_ch):
        raise TeacherError(f"{unet_dir}: {out_ch} output channels for {in_ch} input channels")
    return in_ch, out_ch, _sample_size(config.get("sample_size"))


def plan_folder(folder: Path) -> FolderPlan:
    """Read and check a diffusers folder's configs (see the module docstring for the layouts)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TeacherError(f"{folder}: no such folder")
    denoiser_dir = _denoiser_dir(folder)
    config = read_config(denoiser_dir / "config.json")
    pipeline = _pipeline_class(folder)
    dit = denoiser_dir.name == "transformer" or is_dit_config(config)
    if dit:
        dit_config(config, source=str(denoiser_dir))  # refuses non-DiT transformers by name
        in_ch, out_ch, size = dit_shapes(config, source=str(denoiser_dir))
    else:
        in_ch, out_ch, size = _unet_shapes(denoiser_dir, config)
    ae_dir = autoencoder_folder(folder)
    scale = None
    if ae_dir is not None:
        raw = read_config(ae_dir / "config.json")
        scale = latent_scale(raw.get("_class_name") or
                             ("VQModel" if ae_dir.name == "vqvae" else "AutoencoderKL"), raw,
                             pipeline=pipeline)
        if raw.get("latent_channels") not in (None, in_ch):
            raise TeacherError(f"{folder}: {ae_dir.name}/ makes {raw['latent_channels']}-channel "
                               f"latents, the denoiser takes {in_ch} channels")
    scheduler = _scheduler_config(folder)
    settings = settings_from_scheduler(scheduler, learn_sigma_output=out_ch == 2 * in_ch,
                                       latent=ae_dir is not None)
    if settings.learn_sigma and out_ch != 2 * in_ch:
        raise TeacherError(
            f"{folder}: the scheduler's variance_type {settings.variance} needs {2 * in_ch} output "
            f"channels, the {'DiT' if dit else 'UNet'} has {out_ch}"
        )
    return FolderPlan(kind="dit" if dit else "unet", denoiser_dir=denoiser_dir,
                      denoiser_config=config, scheduler=scheduler, settings=settings,
                      sample_shape=(in_ch, size, size), autoencoder_dir=ae_dir,
                      latent_scale=scale, pipeline=pipeline,
                      num_classes=int(config.get("num_embeds_ada_norm") or 0) if dit else 0)


def load_diffusers_teacher(
    folder: Path, *, device: str = "cpu", name: str | None = None, source: str | None = None
) -> Teacher:
    """A teacher from a diffusers folder (see the module docstring for the layouts)."""
    folder = Path(folder).expanduser()
    plan = plan_folder(folder)
    model: nn.Module
    if plan.kind == "dit":
        model = load_dit(plan.denoiser_dir, plan.denoiser_config)
    else:
        from diffusers import UNet2DModel

        model = DiffusersUNet(load_component(UNet2DModel, plan.denoiser_dir, config=plan.denoiser_config))
    autoencoder = load_autoencoder(plan.autoencoder_dir, pipeline=plan.pipeline) \
        if plan.autoencoder_dir else None
    info: dict[str, Any] = {"format": "diffusers", "scheduler": plan.scheduler.get("_class_name"),
                            "weights": sorted(p.name for p in weight_files(plan.denoiser_dir)),
                            "autoencoder": type(autoencoder.vae).__name__ if autoencoder else None,
                            "pipeline": plan.pipeline}
    if autoencoder is not None:
        info.update(decode_scale=autoencoder.scaling_factor, decode_shift=autoencoder.shift_factor,
                    decode_scale_source=autoencoder.scale.source)
    teacher = Teacher(
        name=name or folder.name, model=model, settings=plan.settings,
        sample_shape=plan.sample_shape, source=source or str(folder), autoencoder=autoencoder,
        info=info,
    )
    return teacher.to(device)
