"""Teachers in dkdm's own formats: a model file (safetensors + JSON metadata) or a run directory
(yesterday's student is today's teacher). A latent one records its parent teacher in
`info["autoencoder_from"]`; `spec.load_model` attaches that teacher's autoencoder."""

from __future__ import annotations

from pathlib import Path

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import TeacherError
from dkdm_cli.models.io import load_model
from dkdm_cli.teachers.base import Teacher


def load_model_file_teacher(path: Path, *, name: str | None = None, device: str = "cpu") -> Teacher:
    """A teacher from a dkdm model file that carries diffusion settings."""
    model, doc = load_model(Path(path), device=device)
    if "diffusion" not in doc:
        raise TeacherError(f"{path}: model file has no diffusion settings, so it cannot teach")
    settings = DiffusionSettings.from_dict(doc["diffusion"])
    kw = doc["model"]["kwargs"]
    shape = (int(kw["in_channels"]), int(kw["image_size"]), int(kw["image_size"]))
    info = dict(doc.get("teacher", {}))
    if doc.get("autoencoder_from"):
        info["autoencoder_from"] = doc["autoencoder_from"]
    return Teacher(name=name or Path(path).stem, model=model, settings=settings,
                   sample_shape=shape, source=str(path), info=info)


def load_run_teacher(run_dir: Path, *, ema: bool = True, device: str = "cpu") -> Teacher:
    """A run directory's student (EMA weights by default) as a teacher."""
    from dkdm_cli.checkpoint import student_from_run

    model, ckpt = student_from_run(run_dir, ema=ema)
    doc = ckpt.doc
    settings = DiffusionSettings.from_dict(doc["diffusion"])
    shape = tuple(int(s) for s in doc["sample_shape"])
    return Teacher(name=Path(run_dir).name, model=model.to(device), settings=settings,
                   sample_shape=shape, source=str(run_dir),
                   info={"step": ckpt.step, "teacher": doc.get("teacher"),
                         "autoencoder_from": doc.get("autoencoder_from")})
