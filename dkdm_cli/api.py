"""dkdm's Python API. Everything here is stable: names and signatures change only with a major
version. `load_teacher`, `load_student` and `denoiser` return a `Denoiser` (also importable as
`Teacher`, its older name); `distill` trains a student and returns its run directory:

    teacher.model_output(x, t)               raw network output (B, C or 2C, H, W) at steps t (B,)
    teacher.reverse_step_distribution(x, t)  (mean, log_variance) of p(x_{t-1} | x_t)
    teacher.schedule                         the noise process (betas, alphas_cumprod, ...)
    teacher.sample_shape                     (C, H, W) of the space the diffusion runs in
    teacher.decode(x)                        samples to images in [-1, 1] (latent teachers decode)

Example:

    from dkdm_cli.api import denoiser, distill, load_teacher, load_student

    teacher = load_teacher("hf:google/ddpm-cifar10-32")
    adm = load_teacher("cifar10_uncond_50M_500K.pt", arch="iddpm-cifar10")
    student = load_student("runs/digits-unet-n")

    mine = denoiser(my_unet, sample_shape=(1, 28, 28), schedule="cosine", variance="fixed_large")
    run_dir = distill(mine, student="unet-n", iterations=2000, batch_size=64)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from dkdm_cli.teachers.base import Denoiser, Teacher


def load_teacher(spec: str, *, device: str = "cpu", arch: str = "", **arch_kwargs: Any) -> Denoiser:
    """Load a teacher from a spec, as `dkdm distill --teacher` does.

    spec: a registered name (`dkdm teachers`), `hf:ORG/NAME[@REVISION]`, a diffusers folder
    (a dkdm export too), a dkdm run directory or model file, an improved/guided-diffusion `.pt`
    state dict, or `py:FILE.py:FUNCTION` / `py:package.module:FUNCTION`: your own function
    returning `denoiser(...)` (this runs that code).
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


def denoiser(model: nn.Module, *, sample_shape: Sequence[int], num_timesteps: int | None = None,
             schedule: str | None = None, betas: Sequence[float] | None = None,
             prediction: str = "epsilon", variance: str = "fixed_small",
             clip_denoised: bool = True, timesteps: Callable | None = None,
             num_classes: int = 0, null_class: int | None = None,
             decode: Callable | None = None) -> Denoiser:
    """Your own trained diffusion network as a teacher (for `py:` teacher specs, distill, sample,
    eval and export alike); checked on a probe batch, refused in one line (TeacherError).

    model: an nn.Module; `model(x, t)` (or `model(x, t, y)` with num_classes) returns the raw
        output (B, C, H, W), or (B, 2C, H, W) with variance="learned_range".
    sample_shape: (C, H, W) of the space the diffusion runs in.
    num_timesteps: T (default 1000, or len(betas)); schedule: "linear" (the default, DDPM's
        1e-4..0.02), "scaled_linear" or "cosine" (Improved DDPM's); or betas=[...] explicitly.
    prediction: what the output predicts: "epsilon", "x0" or "v".
    variance: the reverse-step variance: "fixed_small" (posterior beta~_t), "fixed_large"
        (sigma^2 = beta_t) or "learned_range" (Improved DDPM's, from C extra channels).
    clip_denoised: clip the predicted x0 to [-1, 1] (right for pixels, wrong for latents).
    timesteps: how the model reads the step: None for integer steps 0..T-1, else a function of
        them, e.g. `lambda t: (t + 1) / 1000` for a model trained on t/T with steps 1..T.
    num_classes, null_class: a class-conditional model's classes 0..num_classes-1 and its "no
        class" label (must be num_classes) if it was trained with label dropout.
    decode: for a latent model, latents (B, C, H, W) -> images in [-1, 1].
    """
    from dkdm_cli.teachers.pyfunc import build_denoiser

    return build_denoiser(model, sample_shape=sample_shape, num_timesteps=num_timesteps,
                          schedule=schedule, betas=betas, prediction=prediction,
                          variance=variance, clip_denoised=clip_denoised, timesteps=timesteps,
                          num_classes=num_classes, null_class=null_class, decode=decode)


def distill(teacher: Denoiser | str, *, student: str = "unet-n",
            student_kwargs: dict[str, Any] | None = None, run_dir: str | Path | None = None,
            force: bool = False, quiet: bool = True, **settings: Any) -> Path:
    """Distill `teacher` (a Denoiser, e.g. from `denoiser()`, or a teacher spec) into `student`
    (a preset from `dkdm students`) without data, as `dkdm distill` does; returns the run
    directory, whose student `load_student` reads. A run directory with checkpoints is
    resumed; one made with other settings is refused unless `force` (it is moved aside).

    settings: any [distill] key of dkdm.toml (iterations=..., batch_size=..., lr=..., mode=...),
    checked as the command line checks them. A stop signal (Ctrl-C) saves a checkpoint and
    raises KeyboardInterrupt.
    """
    from dkdm_cli.config import load_config
    from dkdm_cli.distill.engine import distill as run
    from dkdm_cli.errors import TeacherError

    if isinstance(teacher, Denoiser):
        spec, given = _recorded_spec(teacher), teacher
    elif isinstance(teacher, (str, Path)):
        spec, given = str(teacher), None
    else:
        raise TeacherError(f"distill(): teacher must be a Denoiser or a teacher spec, got "
                           f"{type(teacher).__name__}")
    flags = {"teacher": {"name": spec},
             "student": {"name": student, "kwargs": student_kwargs},
             "distill": {**settings, "run_dir": None if run_dir is None else str(run_dir)}}
    cfg = load_config(None, flags=flags, search_cwd=False)
    result = run(cfg, force=force, quiet=quiet, teacher=given)
    if result.status == "interrupted":
        raise KeyboardInterrupt(f"stopped by {result.signal or 'a signal'}; saved "
                                f"{result.checkpoint}. Call distill again to resume")
    return Path(result.run_dir)


def _recorded_spec(teacher: Denoiser) -> str:
    """The spec a run records for a teacher object: its source when dkdm can load it again
    (a `py:` spec, a file, a hub name), else `python:NAME`."""
    from dkdm_cli.errors import TeacherError
    from dkdm_cli.teachers.spec import IN_MEMORY, classify

    try:
        kind = classify(teacher.source) if teacher.source else "in_memory"
    except TeacherError:
        kind = "in_memory"
    return teacher.source if kind != "in_memory" else f"{IN_MEMORY}{teacher.name}"


__all__ = ["Denoiser", "Teacher", "denoiser", "distill", "load_student", "load_teacher"]
