"""dkdm's Python API. Everything here is stable: names and signatures change only with a major
version. Both functions return a `Denoiser` (also importable as `Teacher`, its older name):

    teacher.model_output(x, t)               raw network output (B, C or 2C, H, W) at steps t (B,)
    teacher.reverse_step_distribution(x, t)  (mean, log_variance) of p(x_{t-1} | x_t)
    teacher.schedule                         the noise process (betas, alphas_cumprod, ...)
    teacher.sample_shape                     (C, H, W) of the space the diffusion runs in
    teacher.decode(x)                        samples to images in [-1, 1] (latent teachers decode)

Example:

    from dkdm_cli.api import load_teacher, load_student

    teacher = load_teacher("hf:google/ddpm-cifar10-32")
    adm = load_teacher("cifar10_uncond_50M_500K.pt", arch="iddpm-cifar10")
    student = load_student("runs/digits-unet-n")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dkdm_cli.teachers.base import Denoiser, Teacher


def load_teacher(spec: str, *, device: str = "cpu", arch: str = "", **arch_kwargs: Any) -> Denoiser:
    """Load a teacher from a spec, as `dkdm distill --teacher` does.

    spec: a registered name (`dkdm teachers`), `hf:ORG/NAME[@REVISION]`, a diffusers folder, a
    dkdm run directory or model file, or an improved/guided-diffusion `.pt` state dict.
    arch, arch_kwargs: only for `.pt` state dicts: a preset name (e.g. "iddpm-cifar10") and/or
    the flags it was trained with, under improved-diffusion's names (num_channels=128, ...).
    """
    from dkdm_cli.teachers.spec import resolve_teacher

    return resolve_teacher(str(spec), arch=arch, arch_kwargs=arch_kwargs, device=device)


def load_student(path: str | Path, *, device: str = "cpu", ema: bool = True) -> Denoiser:
    """Load a distilled student, from a run directory (its latest checkpoint; EMA weights unless
    `ema=False`) or an exported model file, as a Denoiser with the same methods as a teacher."""
    from dkdm_cli.teachers.spec import load_denoiser

    return load_denoiser(path, ema=ema, device=device, students_only=True)


__all__ = ["Denoiser", "Teacher", "load_student", "load_teacher"]
