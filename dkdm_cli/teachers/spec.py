"""Resolving a teacher spec to a Teacher.

A spec says where the teacher comes from:
  digits, ldm-celebahq, ...   a registered name (`dkdm teachers`)
  hf:ORG/NAME[@REVISION]      a Hugging Face hub repository in diffusers format
  ./path/                     a diffusers folder, or a dkdm run directory
  ./model.safetensors         a dkdm model file (an export, or a built-in teacher)
  ./ckpt.pt                   an improved/guided-diffusion state dict (give its architecture)
  ./export/                   a dkdm diffusers export (`dkdm export --format diffusers`)
  py:FILE.py:FUNCTION         your own model: FUNCTION() returns dkdm_cli.api.denoiser(...)
  py:package.module:FUNCTION  the same from an importable module (teachers/pyfunc.py)
Anything else is refused with how to fix it. `python:NAME` is how a run records a teacher that
was handed to dkdm_cli.api.distill as an object: it cannot be loaded again by that name.
"""

from __future__ import annotations

from pathlib import Path

from dkdm_cli.errors import TeacherError, UserError
from dkdm_cli.teachers.base import Denoiser
from dkdm_cli.teachers.registry import TEACHERS  # filled by dkdm_cli/teachers/__init__.py

ADM_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


IN_MEMORY = "python:"  # the spec a run records for a teacher object given to api.distill


def classify(spec: str) -> str:
    """One of: registered, hub, py, in_memory, run_dir, dkdm_export, diffusers_dir, model_file,
    adm_checkpoint."""
    from dkdm_cli.diffusers_export.layout import is_export_folder

    if spec.startswith("hf:"):
        return "hub"
    if spec.startswith("py:"):
        return "py"
    if spec.startswith(IN_MEMORY):
        return "in_memory"
    if spec in TEACHERS:
        return "registered"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir() or (path / "config.resolved.toml").is_file():
            return "run_dir"
        if is_export_folder(path):
            return "dkdm_export"
        if any((path / p).exists() for p in ("model_index.json", "unet", "transformer",
                                               "config.json")):
            return "diffusers_dir"
        raise TeacherError(
            f"{spec}: a folder, but neither a dkdm run directory nor a diffusers model "
            "(expected checkpoints/, model_index.json, unet/, transformer/ or config.json inside)"
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
    raise TeacherError(f"{TEACHERS.unknown(spec)}. Or give hf:ORG/NAME or a path")


def resolve_teacher(
    spec: str, *, arch: str = "", arch_kwargs: dict | None = None, device: str = "cpu"
) -> Denoiser:
    """Load the teacher a spec names, on `device`."""
    kind = classify(spec)
    if kind == "registered":
        return TEACHERS.create(spec).load(device=device)
    if kind == "model_file":
        from dkdm_cli.teachers.native import load_model_file_teacher

        return load_model_file_teacher(Path(spec), device=device, resolve=resolve_teacher)
    if kind == "run_dir":
        from dkdm_cli.teachers.native import load_run_teacher

        return load_run_teacher(Path(spec), device=device, resolve=resolve_teacher)
    if kind == "hub":
        from dkdm_cli.teachers.hub import load_hub_teacher

        return load_hub_teacher(spec[3:], device=device)
    if kind == "py":
        from dkdm_cli.teachers.pyfunc import load_py_teacher

        return load_py_teacher(spec, device=device)
    if kind == "in_memory":
        raise TeacherError(f"{spec}: a teacher built in Python (dkdm_cli.api.denoiser) and given "
                           "to dkdm as an object; it cannot be loaded again by this name. Give it "
                           "as py:FILE.py:FUNCTION to use it here")
    if kind == "dkdm_export":
        from dkdm_cli.teachers.native import load_export_teacher

        return load_export_teacher(Path(spec), device=device)
    if kind == "diffusers_dir":
        from dkdm_cli.teachers.diffusers_folder import load_diffusers_teacher

        return load_diffusers_teacher(Path(spec), device=device)
    from dkdm_cli.teachers.adm import load_adm_teacher

    return load_adm_teacher(Path(spec), arch=arch, arch_kwargs=arch_kwargs or {}, device=device)


STUDENT_KINDS = ("run_dir", "model_file", "dkdm_export")


def load_denoiser(spec: str | Path, *, ema: bool = True, device: str = "cpu",
                  students_only: bool = False) -> Denoiser:
    """The one answer to "run directory, model file or teacher?" (api, `dkdm sample`, `dkdm eval`).

    An existing run directory gives its latest student (EMA weights unless `ema=False`); a dkdm
    model file its one set of weights; anything else is a teacher spec (`resolve_teacher`), unless
    `students_only`, which accepts only the first two.
    """
    text = str(spec)
    path = Path(text).expanduser()
    kind = classify(str(path)) if path.exists() else None
    if students_only and kind not in STUDENT_KINDS:
        raise TeacherError(f"{path}: no such run directory or model file" if kind is None else
                           f"{path}: not a dkdm run directory or exported model (.safetensors, "
                           "or a diffusers export folder)")
    if not ema and kind != "run_dir":
        raise UserError(f"{text}: --no-ema applies to run directories; an exported model or a "
                        "teacher holds one set of weights (choose at export time with "
                        "dkdm export --no-ema)")
    if kind == "run_dir":
        from dkdm_cli.teachers.native import load_run_teacher

        return load_run_teacher(path, ema=ema, device=device, resolve=resolve_teacher)
    if kind == "model_file":
        from dkdm_cli.teachers.native import load_model_file_teacher

        return load_model_file_teacher(path, device=device, resolve=resolve_teacher)
    return resolve_teacher(text, device=device)


def recorded_parent(spec: str, *, kind: str) -> str | None:
    """The teacher spec a student (`spec`, of `kind` from classify) records it was distilled
    from, or None (a teacher that is not a student, or one that records nothing)."""
    from dkdm_cli.models.io import read_model_doc

    path = Path(spec).expanduser()
    if kind == "run_dir":
        from dkdm_cli.checkpoint import load_latest

        ckpt = load_latest(path)
        parent = ckpt.doc.get("teacher") if ckpt is not None else None
    elif kind in ("model_file", "dkdm_export"):
        if kind == "dkdm_export":
            from dkdm_cli.diffusers_export.layout import WEIGHTS, model_folder

            folder = model_folder(path)
            if folder is None:
                return None
            path = folder / WEIGHTS
        parent = read_model_doc(path).get("teacher")
        parent = parent.get("spec") if isinstance(parent, dict) else parent
    else:
        return None
    return parent if isinstance(parent, str) and parent else None
