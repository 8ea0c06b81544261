"""Real images for `mode = "data"`, the data-driven reference that studies compare DKDM with.

This is the one place dkdm reads training data, and only when asked: DKDM itself never does.
Images come from a folder (PNG/JPEG) or an .npz (`arr_0`, uint8 N x H x W x C), must already
have the teacher's size, and are mapped from 0..255 to [-1, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dkdm_cli.errors import ConfigError


def open_images(path: str, shape: tuple[int, int, int]):
    """The image set at `path`, checked against the teacher's (C, H, W) `shape` without decoding
    the pixels: every image's header and chunks, an .npz's layout and length (the engine calls
    it before touching the run directory)."""
    from dkdm_cli.evaluate.inputs import folder_images, read_npz

    if not path:
        raise ConfigError("mode data needs distill.data: a folder or .npz of real images")
    p = Path(path).expanduser()
    if p.is_dir():
        images = folder_images(p, verify=True)
    elif p.is_file() and p.suffix == ".npz":
        images, _stats = read_npz(p)
        if images is None:
            raise ConfigError(f"distill.data {path}: the .npz holds no images (arr_0)")
    else:
        raise ConfigError(f"distill.data {path}: no such folder or .npz")
    c, h, w = shape
    if tuple(images.shape[:2]) != (h, w):
        raise ConfigError(f"distill.data {path}: images are {images.shape[1]}x{images.shape[0]}, "
                          f"the teacher's are {w}x{h}; resize them first")
    if c not in (1, 3):
        raise ConfigError(f"mode data supports 1- or 3-channel pixel teachers, not {c} channels")
    return images


def load_images(path: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """(N, C, H, W) float32 in [-1, 1] from a folder or .npz of images of (C, H, W) `shape`."""
    images = open_images(path, shape)
    c = shape[0]
    rgb = np.concatenate(list(images.batches(1024)))  # (N, H, W, 3) uint8
    if c == 1:
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ConfigError(f"distill.data {path}: colour images, but the teacher has 1 channel")
        arr = rgb[..., :1]
    else:
        arr = rgb
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    return x / 127.5 - 1.0
