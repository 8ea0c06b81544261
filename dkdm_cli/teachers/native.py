"""Teachers in dkdm's own formats: a model file (safetensors + JSON metadata) or a run directory
(yesterday's student is today's teacher).

A latent student records its teacher in `autoencoder_from`; the autoencoder is that teacher's.
Resolving an arbitrary teacher spec is teachers/spec.py's job, so the caller passes it in as
`resolve` (spec.py does): this module never imports upward.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import TeacherError
from dkdm_cli.models.io import load_model
from dkdm_cli.teachers.base import Denoiser

# spec -> the Denoiser it names, on a device (teachers.spec.resolve_teacher).
Resolver = Callable[..., Denoiser]


def _attach_autoencoder(denoiser: Denoiser, doc: dict[str, Any], *, device: str,
                        resolve: Resolver | None) -> Denoiser:
    """Give a latent student its teacher's autoencoder (named by `autoencoder_from`)."""
    parent = doc.get("autoencoder_from")
    if not parent:
        return denoiser
    if resolve is None:
        raise TeacherError(f"{denoiser.source}: a latent model (decoded by {parent}'s autoencoder); "
                           "load it with dkdm_cli.api.load_student or load_teacher")
    denoiser.autoencoder = resolve(parent, device=device).autoencoder
    return denoiser


def _file_denoiser(path: Path, *, name: str, device: str) -> tuple[Denoiser, dict[str, Any]]:
    """(denoiser without its autoencoder, document) from a dkdm model file."""
    model, doc = load_model(Path(path), device=device)
    if "diffusion" not in doc:
        raise TeacherError(f"{path}: model file has no diffusion settings, so it cannot teach")
    settings = DiffusionSettings.from_dict(doc["diffusion"])
    kw = doc["model"]["kwargs"]
    shape = (int(kw["in_channels"]), int(kw["image_size"]), int(kw["image_size"]))
    return Denoiser(name=name, model=model, settings=settings, sample_shape=shape,
                    source=str(path), info=doc.get("teacher", {}), sampler=doc.get("sampler")), doc


def load_model_file_teacher(path: Path, *, name: str | None = None, device: str = "cpu",
                            resolve: Resolver | None = None) -> Denoiser:
    """A teacher from a dkdm model file that carries diffusion settings."""
    denoiser, doc = _file_denoiser(path, name=name or Path(path).stem, device=device)
    return _attach_autoencoder(denoiser, doc, device=device, resolve=resolve)


def load_export_teacher(folder: Path, *, device: str = "cpu") -> Denoiser:
    """A dkdm diffusers export (diffusers_export/layout.py) as a teacher or a model: its weights
    file is a dkdm model file, and a latent one decodes with the folder's own vae/."""
    from dkdm_cli.diffusers_export.layout import AUTOENCODER, WEIGHTS, model_folder
    from dkdm_cli.teachers.autoencoders import load_autoencoder

    folder = Path(folder)
    component = model_folder(folder)
    if component is None:
        raise TeacherError(f"{folder}: a dkdm diffusers export without unet/{WEIGHTS} or "
                           f"transformer/{WEIGHTS}")
    denoiser, _doc = _file_denoiser(component / WEIGHTS, name=folder.name, device=device)
    denoiser.source = str(folder)
    if (folder / AUTOENCODER / "config.json").is_file():
        denoiser.autoencoder = load_autoencoder(folder / AUTOENCODER).to(device)
    return denoiser


def load_run_teacher(run_dir: Path, *, ema: bool = True, device: str = "cpu",
                     resolve: Resolver | None = None) -> Denoiser:
    """A run directory's student (EMA weights by default) as a teacher."""
    from dkdm_cli.checkpoint import student_from_run

    model, ckpt = student_from_run(run_dir, ema=ema)
    doc = ckpt.doc
    settings = DiffusionSettings.from_dict(doc["diffusion"])
    shape = tuple(int(s) for s in doc["sample_shape"])
    denoiser = Denoiser(name=Path(run_dir).name, model=model.to(device), settings=settings,
                        sample_shape=shape, source=str(run_dir),
                        info={"step": ckpt.step, "teacher": doc.get("teacher"), "ema": ema,
                              "guidance_scale": float(((doc.get("config") or {}).get("distill")
                                                       or {}).get("guidance_scale", 1.0))},
                        sampler=doc.get("sampler"))
    return _attach_autoencoder(denoiser, doc, device=device, resolve=resolve)
