"""Generating images from any denoiser (teacher, student, export) and writing them out."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dkdm_cli.diffusion.samplers import Sampler, sample
from dkdm_cli.errors import UserError
from dkdm_cli.teachers.base import Teacher


def initial_noise(num: int, shape: tuple[int, int, int], *, seed: int) -> torch.Tensor:
    """x_T for `num` samples, drawn on the CPU so every device starts from the same noise."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=gen)  # (N, C, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, the layout ADM/DiT evaluation suites read."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(
    teacher: Teacher,
    *,
    num: int,
    steps: int = 50,
    sampler: str = "iddpm",
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    noise: torch.Tensor | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """`num` images (N, H, W, C) uint8 from `teacher` (any Teacher, students included).

    Same seed, batch size and device give the same images.
    """
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    noise = initial_noise(num, teacher.sample_shape, seed=seed) if noise is None else noise
    step_gen = torch.Generator(device=device).manual_seed(seed + 1)
    out = []
    for start in range(0, num, batch_size):
        x_T = noise[start:start + batch_size].to(device)
        x0 = sample(teacher.denoise, teacher.diffusion, noise=x_T, steps=steps,
                    sampler=Sampler(sampler), eta=eta, clip_denoised=teacher.settings.clip_denoised,
                    generator=step_gen)
        out.append(to_uint8(teacher.decode(x0)))
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
        path = out_dir / f"{prefix}{i:06d}.png"
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
        paths.append(path)
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
    from PIL import Image

    grid = make_grid(images, nrow=nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
