"""Tiny teachers of every family dkdm reads, built on the fly (nothing is downloaded): for the
test suite (tests/conftest.py) and for `benchmarks/gpu_check.sh --smoke`, which must run the
same families on the CPU that the GPU check runs at full size.

Each has a few thousand parameters and non-zero weights everywhere (zero-initialised output
layers would make a test comparing outputs vacuous). Not part of the stable API.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.models import create_model
from dkdm_cli.models.io import save_model

TINY_UNET = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                 num_heads=1)
ADM_ARCH = "improved-diffusion"
ADM_FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_heads=2, learn_sigma=True, diffusion_steps=100,
                 noise_schedule="cosine")
DIT_CLASSES = 3  # the tiny DiT folder's classes (plus a null row)


def randomize(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere, N(0, std^2), seeded; returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def write_teacher_file(path: Path, *, learn_sigma: bool = True, num_timesteps: int = 20,
                       image_size: int = 8, channels: int = 1, seed: int = 0,
                       variance: str | None = None, num_classes: int = 0,
                       class_null: bool = False) -> Path:
    """A dkdm model file holding a tiny random UNet teacher with a short noise schedule
    (class-conditional with `num_classes`, with a null class when `class_null`).

    Its zero-initialised output layer is randomised so the teacher's eps is not trivially 0.
    """
    torch.manual_seed(seed)
    labels = dict(num_classes=num_classes, class_null=class_null) if num_classes else {}
    model = create_model("unet-t", image_size=image_size, in_channels=channels,
                         learn_sigma=learn_sigma, **TINY_UNET, **labels)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    settings = DiffusionSettings(
        schedule="cosine", num_timesteps=num_timesteps,
        variance=variance or ("learned_range" if learn_sigma else "fixed_small"),
    )
    save_model(model, path, extra={"diffusion": settings.to_dict()})
    return path


def tiny_unet2d(*, in_channels: int = 3, out_channels: int = 6, sample_size: int = 8) -> nn.Module:
    """A ~12k-parameter diffusers UNet2DModel with one attention level."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       layers_per_block=1, block_out_channels=(4, 8),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                       attention_head_dim=4)
    return randomize(unet)


def tiny_vqmodel(*, scaling_factor: float = 0.7) -> nn.Module:
    """A tiny diffusers VQModel: 16x16x3 images <-> 8x8x3 latents."""
    from diffusers import VQModel

    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                 layers_per_block=1, latent_channels=3, norm_num_groups=2, num_vq_embeddings=16,
                 vq_embed_dim=3, sample_size=16, scaling_factor=scaling_factor)
    return randomize(vq, std=0.1)


def write_ddpm_folder(path: Path, *, variance_type: str = "learned_range",
                      prediction_type: str = "epsilon", beta_schedule: str = "squaredcos_cap_v2",
                      num_train_timesteps: int = 100, **scheduler_kw) -> Path:
    """A diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/) saved by diffusers."""
    from diffusers import DDPMPipeline, DDPMScheduler

    learned = variance_type in ("learned", "learned_range")
    unet = tiny_unet2d(out_channels=6 if learned else 3)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, variance_type=variance_type,
                              prediction_type=prediction_type, beta_schedule=beta_schedule,
                              **scheduler_kw)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


def write_ldm_folder(path: Path) -> Path:
    """A diffusers LDMPipeline folder (unet/, vqvae/, scheduler/ with a DDIM config) as LDM ships."""
    from diffusers import DDIMScheduler, LDMPipeline

    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear",
                              beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=tiny_vqmodel(), unet=tiny_unet2d(out_channels=3),
                scheduler=scheduler).save_pretrained(str(path))
    return path


def write_dit_folder(path: Path, *, num_train_timesteps: int = 50) -> Path:
    """A DiTPipeline saved by diffusers (safetensors): 16x16x3 images <-> 8x8x4 latents through
    an AutoencoderKL, a DiT with DIT_CLASSES classes (+ the null row), learned sigma, linear DDIM
    config without clipping."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=DIT_CLASSES)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=16)
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                              clip_sample=False)
    DiTPipeline(transformer=randomize(transformer), vae=randomize(vae, std=0.1, seed=1),
                scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return path


def write_adm_checkpoint(path: Path, *, arch: str = ADM_ARCH, flags: dict | None = None,
                         seed: int = 0) -> Path:
    """An improved-diffusion-format state dict (.pt) for `flags`, written with torch.save."""
    from dkdm_cli.teachers.adm import build_unet, resolve_flags, to_adm_state_dict

    model = randomize(build_unet(resolve_flags(arch, flags or ADM_FLAGS)), std=0.05, seed=seed)
    torch.save(to_adm_state_dict(model), path)
    return path
