"""Resolving a teacher spec to a Teacher.

A spec says where the teacher comes from:
  digits, ldm-celebahq, ...   a registered name (`dkdm teachers`)
  hf:ORG/NAME[@REVISION]      a Hugging Face hub repository in diffusers format
  ./path/                     a diffusers folder, or a dkdm run directory
  ./model.safetensors         a dkdm model file (an export, or a built-in teacher)
  ./ckpt.pt                   an improved/guided-diffusion state dict (give its architecture)
Anything else is refused with how to fix it.
"""

from __future__ import annotations

from pathlib import Path

from dkdm_cli.errors import RegistryError, TeacherError
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.registry import TEACHERS

ADM_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def classify(spec: str) -> str:
    """One of: registered, hub, run_dir, diffusers_dir, model_file, adm_checkpoint."""
    if spec.startswith("hf:"):
        return "hub"
    if spec in TEACHERS:
        return "registered"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir() or (path / "config.resolved.toml").is_file():
            return "run_dir"
        if any((path / p).exists() for p in ("model_index.json", "unet", "config.json")):
            return "diffusers_dir"
        raise TeacherError(
            f"{spec}: a folder, but neither a dkdm run directory nor a diffusers model "
            "(expected checkpoints/, model_index.json, unet/ or config.json inside)"
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            return "model_file"
        if path.suffix in ADM_SUFFIXES:
            return "adm_checkpoint"
        raise TeacherError(
            f"{spec}: unknown teacher file type {path.suffix!r}; expected .safetensors (dkdm) "
            f"or {', '.join(ADM_SUFFIXES)} (improved/guided-diffusion)"
        )
    if "/" in spec and not spec.startswith((".", "/", "~")):
        raise TeacherError(
            f"{spec!r} is ambiguous: no such local path. For a hub model write hf:{spec}; "
            f"for a local folder write ./{spec}"
        )
    if spec.startswith((".", "/", "~")) or Path(spec).suffix:
        raise TeacherError(f"{spec}: no such file or folder")
    try:
        TEACHERS.resolve(spec)  # not registered (checked above): raises with suggestions
    except RegistryError as exc:
        raise TeacherError(f"{exc}. Or give hf:ORG/NAME or a path") from exc
    raise TeacherError(f"{spec}: not a teacher spec")


def resolve_teacher(
    spec: str, *, arch: str = "", arch_kwargs: dict | None = None, device: str = "cpu"
) -> Teacher:
    """Load the teacher a spec names, on `device`."""
    kind = classify(spec)
    if kind == "registered":
        return TEACHERS.create(spec).load(device=device)
    if kind in ("model_file", "run_dir"):
        return load_model(spec, device=device)
    if kind == "hub":
        from dkdm_cli.teachers.hub import load_hub_teacher

        return load_hub_teacher(spec[3:], device=device)
    if kind == "diffusers_dir":
        from dkdm_cli.teachers.diffusers_folder import load_diffusers_teacher

        return load_diffusers_teacher(Path(spec), device=device)
    from dkdm_cli.teachers.adm import load_adm_teacher

    return load_adm_teacher(Path(spec), arch=arch, arch_kwargs=arch_kwargs or {}, device=device)


def load_model(spec: str, *, ema: bool = True, device: str = "cpu", students_only: bool = False) -> Teacher:
    """The one place that decides "run directory, model file or teacher?": a dkdm run directory
    (its newest checkpoint; EMA weights unless `ema=False`) or model file is loaded as such (a
    latent one with its parent teacher's autoencoder); anything else is resolved as a teacher
    spec, unless `students_only`."""
    from dkdm_cli.teachers.native import load_model_file_teacher, load_run_teacher

    path = Path(spec).expanduser()
    kind = classify(str(path)) if path.exists() else None
    if kind == "run_dir":
        model = load_run_teacher(path, ema=ema, device=device)
    elif kind == "model_file":
        model = load_model_file_teacher(path, device=device)
    elif students_only:
        if not path.exists():
            raise TeacherError(f"{spec}: no such run directory or model file")
        raise TeacherError(f"{spec}: not a dkdm run directory or exported model file (.safetensors)")
    else:
        if not ema:
            raise TeacherError("--no-ema applies to a run directory")
        return resolve_teacher(spec, device=device)
    parent = model.info.get("autoencoder_from")
    if parent:  # a latent student decodes with its teacher's autoencoder
        model.autoencoder = resolve_teacher(parent, device=device).autoencoder
    return model
