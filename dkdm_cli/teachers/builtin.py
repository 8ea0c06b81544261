"""Teachers that ship inside the package (no download): `digits` and its class-conditional
sibling `digits-cond`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from dkdm_cli.teachers.base import Teacher, TeacherEntry
from dkdm_cli.teachers.registry import register_teacher


def builtin_weights(name: str) -> Path:
    """Path of a shipped weight file."""
    return Path(str(resources.files("dkdm_cli.teachers") / "weights" / f"{name}.safetensors"))


def _loader(name: str):
    def load(device: str = "cpu") -> Teacher:
        from dkdm_cli.teachers.native import load_model_file_teacher

        return load_model_file_teacher(builtin_weights(name), name=name, device=device)

    return load


# dkdm's own license: the weights were trained by dkdm on scikit-learn's bundled digits.
_LICENSE = "MIT (dkdm's)"
_SOURCE = "built-in (trained by scripts/train_digits_teacher.py on scikit-learn's digits)"
register_teacher(TeacherEntry(
    name="digits", source=_SOURCE,
    description="16x16 grey handwritten digits, unet-t, cosine T=1000, learned variance",
    image_size=16, channels=1, parameters=679_226, load=_loader("digits"),
    is_cached=lambda: builtin_weights("digits").is_file(),
    weights="safetensors shipped in the package", license=_LICENSE,
))
register_teacher(TeacherEntry(
    name="digits-cond", source=_SOURCE,
    description="digits, class-conditional on the real labels 0-9 with a null class (10) for "
                "classifier-free guidance; digits fine-tuned with labels",
    image_size=16, channels=1, parameters=680_282, load=_loader("digits-cond"),
    num_classes=10, null_class=10,
    is_cached=lambda: builtin_weights("digits-cond").is_file(),
    weights="safetensors shipped in the package", license=_LICENSE,
))
