"""Generating images from any denoiser (teacher, student, export) and writing them out."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dkdm_cli import _fs
from dkdm_cli.diffusion.consistency import SAMPLING_STEPS
from dkdm_cli.diffusion.samplers import Sampler, sample
from dkdm_cli.errors import SamplingError, UserError
from dkdm_cli.teachers.base import Teacher


def initial_noise(num: int, shape: tuple[int, int, int], *, seed: int) -> torch.Tensor:
    """x_T for `num` samples, drawn on the CPU so every device starts from the same noise."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=gen)  # (N, C, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, the layout ADM/DiT evaluation suites read."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample_labels(denoiser: Teacher, num: int, *, seed: int,
                  classes: list[int] | tuple[int, ...] | None = None) -> torch.Tensor | None:
    """Class labels (N,) for sampling a class-conditional denoiser (None for an unconditional
    one): `classes` repeated in turn, or with none given, uniform over all classes (seeded,
    independent of the noise)."""
    if not denoiser.conditional:
        if classes:
            raise UserError(f"--class: {denoiser.name} is unconditional (it has no classes)")
        return None
    if classes:
        y = torch.tensor(list(classes), dtype=torch.long)
        bad = y[(y < 0) | (y >= denoiser.num_classes)]
        if len(bad):
            raise UserError(f"--class {int(bad[0])}: {denoiser.name} has classes "
                            f"0..{denoiser.num_classes - 1}")
        return y.repeat(math.ceil(num / len(y)))[:num]
    gen = torch.Generator().manual_seed(seed + 3)
    return torch.randint(int(denoiser.num_classes), (num,), generator=gen)


DEFAULT_STEPS = 50  # the respaced IDDPM sampling the paper evaluates with


@dataclass(frozen=True)
class Sampling:
    """A sampler resolved for one model: what `auto` means for it."""

    sampler: str
    steps: int
    top: int | None = None  # consistency sampling: the ladder's first step

    def describe(self) -> dict:
        """For --json outputs and eval records."""
        out = {"sampler": self.sampler, "steps": self.steps}
        if self.top is not None:
            out["top"] = self.top
        return out


def resolve_sampling(model: Teacher, sampler: str = "auto", steps: int | str = "auto") -> Sampling:
    """`sampler` / `steps` for `model`: "auto" is the sampler the model records (a few-step
    student's multistep consistency sampling, at its steps) or IDDPM at 50 steps (all T when
    the model has fewer)."""
    recorded = model.sampler or {}
    name = recorded.get("name", "iddpm") if sampler == "auto" else str(sampler)
    few = name == "consistency"
    if steps == "auto":
        steps = SAMPLING_STEPS if few else min(DEFAULT_STEPS, model.diffusion.num_timesteps)
    top = recorded.get("top") if few and recorded.get("name") == "consistency" else None
    return Sampling(name, int(steps), top)


def reference_sampling(student: Sampling, num_timesteps: int = DEFAULT_STEPS) -> Sampling:
    """How a teacher (of `num_timesteps` steps) is sampled beside a student: the same sampler
    and steps, except beside a few-step student, whose teacher samples as teachers do (IDDPM,
    50 steps, or all of them when it has fewer)."""
    if student.sampler == "consistency":
        return Sampling("iddpm", min(DEFAULT_STEPS, num_timesteps))
    return Sampling(student.sampler, student.steps)


@torch.no_grad()
def generate(
    teacher: Teacher,
    *,
    num: int,
    steps: int | str = "auto",
    sampler: str = "auto",
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
    labels: torch.Tensor | None = None,
    cfg: float = 1.0,
) -> np.ndarray:
    """`num` images (N, H, W, C) uint8 from `teacher` (any Teacher, students included).

    A class-conditional denoiser samples `labels` (N,) (default: `sample_labels`) with
    classifier-free guidance at scale `cfg` (1: none). Same seed, batch size and device give the
    same images.
    """
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if labels is None:
        labels = sample_labels(teacher, num, seed=seed)
    teacher.check_labels(labels)
    teacher.denoise_fn(None if labels is None else labels[:1], cfg=cfg)  # refuse a bad --cfg now
    how = resolve_sampling(teacher, sampler, steps)
    noise = initial_noise(num, teacher.sample_shape, seed=seed) if noise is None else noise
    step_gen = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for start in range(0, num, batch_size):
        x_T = noise[start:start + batch_size].to(device)
        y = None if labels is None else labels[start:start + batch_size].to(device)  # (b,)
        x0 = sample(teacher.denoise_fn(y, cfg=cfg), teacher.diffusion, noise=x_T, steps=how.steps,
                    sampler=Sampler(how.sampler), eta=eta, top=how.top,
                    clip_denoised=teacher.settings.clip_denoised, generator=step_gen)
        images = teacher.decode(x0)  # (b, C, H, W) in [-1, 1]
        # One check per batch (to_uint8 syncs here anyway): NaN would become black pixels silently.
        if not bool(torch.isfinite(images).all()):
            raise SamplingError(
                f"{teacher.name}: samples {start}..{start + len(x_T) - 1} came out non-finite (NaN "
                f"or inf); its weights, or these settings (--cfg {cfg:g}, --steps {steps}), give no "
                "usable images. Nothing was written")
        out.append(to_uint8(images))
        if on_batch is not None:
            on_batch(len(x_T))
    return np.concatenate(out)


def save_png_folder(images: np.ndarray, out_dir: Path, *, prefix: str = "") -> list[Path]:
    """Write images (N, H, W, C) uint8 as 000000.png, 000001.png, ..."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        paths.append(_fs.atomic_write(out_dir / f"{prefix}{i:06d}.png",
                                      lambda fh, p=pil: p.save(fh, format="PNG")))
    return paths


def make_grid(images: np.ndarray, *, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images (N, H, W, C) into one (rows*H', cols*W', C) image with `pad` px borders."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def save_grid(images: np.ndarray, path: Path, *, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a grid PNG of `images` (nearest-neighbour upscaled by `scale`)."""
    return write_png(make_grid(images, nrow=nrow), path, scale=scale)


def write_png(image: np.ndarray, path: Path, *, scale: int = 1) -> Path:
    """Write one (H, W, C) uint8 image as PNG, nearest-neighbour upscaled by `scale`."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return _fs.atomic_write(Path(path), lambda fh: pil.save(fh, format="PNG"))


def save_npz(images: np.ndarray, path: Path, *, labels: np.ndarray | None = None) -> Path:
    """Write images (N, H, W, C) uint8 as `arr_0` of an .npz (and class labels (N,) as `arr_1`),
    the layout the ADM and DiT evaluation suites read; written atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"--npz {path}: the file name must end in .npz")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"expected (N, H, W, C) uint8 images, got {images.dtype} {images.shape}")
    # A file object: numpy adds no second suffix.
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    return _fs.atomic_write(path, lambda fh: np.savez(fh, **arrays))


def recorded_teacher_spec(model: Teacher) -> str | None:
    """The spec of the teacher a student was distilled from, as its run or export records it.

    Run directories keep it as a string (`teacher`), exports as `{"spec": ...}`; a model that
    was not distilled (e.g. the built-in `digits`) records none.
    """
    info = model.info if isinstance(model.info, dict) else {}
    for value in (info.get("teacher"), info.get("spec")):
        if isinstance(value, str) and value:
            return value
        if isinstance(value, dict) and isinstance(value.get("spec"), str):
            return value["spec"]
    return None


def distilled_guidance(model: Teacher) -> float:
    """The guidance scale a student was distilled at (`distill.guidance_scale`; 1 for none, and
    for teachers): its samples at --cfg 1 imitate the teacher's at this scale."""
    info = model.info if isinstance(model.info, dict) else {}
    teacher = info.get("teacher")
    value = info.get("guidance_scale") or (teacher.get("guidance_scale")
                                           if isinstance(teacher, dict) else None)
    return float(value or 1.0)


def teacher_scale(student: Teacher, cfg: float) -> float:
    """The guidance scale to sample a student's teacher at, to compare like with like: the
    user's --cfg, or at --cfg 1 the scale the student was distilled at."""
    return cfg if cfg != 1.0 else distilled_guidance(student)


def side_by_side(left: np.ndarray, right: np.ndarray, *, gap: int = 4) -> np.ndarray:
    """Two grid images (H, W, C) next to each other with a white `gap` px band between them."""
    h = max(left.shape[0], right.shape[0])
    c = left.shape[2]
    out = np.full((h, left.shape[1] + gap + right.shape[1], c), 255, dtype=np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap:] = right
    return out


def save_comparison(teacher_images: np.ndarray, student_images: np.ndarray, path: Path,
                    *, scale: int = 1) -> Path:
    """Write the teacher grid (left) and the student grid (right) as one PNG."""
    if teacher_images.shape != student_images.shape:
        raise UserError(
            f"teacher images {teacher_images.shape} and student images {student_images.shape} "
            "differ in shape, so they cannot be compared side by side"
        )
    return write_png(side_by_side(make_grid(teacher_images), make_grid(student_images)), path,
                     scale=scale)


def compare_with_teacher(
    student: Teacher, teacher: Teacher, *, noise: torch.Tensor, steps: int | str, sampler: str,
    eta: float, seed: int, batch_size: int, device: torch.device | str,
    student_images: np.ndarray | None = None, labels: torch.Tensor | None = None, cfg: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(teacher images, student images), each (N, H, W, C) uint8, from the same x_T `noise`
    (N, C, H, W), the same per-step noise and (class-conditional) the same labels and guidance
    (a student distilled on guided targets is set beside its teacher at that scale), so each
    pair differs only by the model. Beside a few-step student the teacher samples as teachers
    do (`reference_sampling`).

    `student_images` are reused when the caller already sampled exactly this noise in one batch.
    """
    if tuple(teacher.sample_shape) != tuple(student.sample_shape):
        raise UserError(
            f"the teacher samples {tuple(teacher.sample_shape)} but the student "
            f"{tuple(student.sample_shape)}: they cannot start from the same noise"
        )
    mine = resolve_sampling(student, sampler, steps)
    ref = reference_sampling(mine, teacher.diffusion.num_timesteps)
    kw = dict(num=len(noise), eta=eta, seed=seed, batch_size=batch_size, device=device, noise=noise,
              labels=labels)
    if student_images is None:
        student_images = generate(student, **kw, sampler=mine.sampler, steps=mine.steps, cfg=cfg)
    return generate(teacher, **kw, sampler=ref.sampler, steps=ref.steps,
                    cfg=teacher_scale(student, cfg)), student_images
