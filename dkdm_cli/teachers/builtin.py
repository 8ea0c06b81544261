"""Teachers that ship inside the package (no download): `digits`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dkdm_cli.teachers.base import Teacher, TeacherEntry
from dkdm_cli.teachers.registry import register_teacher


def builtin_weights(name: str) -> Path:
    """Path of a shipped weight file."""
    return Path(str(resources.files("dkdm_cli.teachers") / "weights" / f"{name}.safetensors"))


def _load_digits(device: str = "cpu") -> Teacher:
    from dkdm_cli.teachers.native import load_model_file_teacher

    return load_model_file_teacher(builtin_weights("digits"), name="digits", device=device)


register_teacher(TeacherEntry(
    name="digits",
    source="built-in (trained by scripts/train_digits_teacher.py on scikit-learn's digits)",
    description="16x16 grey handwritten digits, unet-t, cosine T=1000, learned variance",
    image_size=16, channels=1, parameters=679_226, load=_load_digits,
    is_cached=lambda: builtin_weights("digits").is_file(),
    weights="safetensors shipped in the package",
))
