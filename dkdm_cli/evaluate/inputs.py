"""What `dkdm eval` scores and against what: image sets (a folder, an .npz, samples held in
memory), reference statistics, and the caches keyed by content.

Image sets stream in batches, so a 50,000-image .npz or folder never has to fit in memory, and
each carries a content hash (sha256) that keys the feature cache and goes into the results:
  array / .npz   sha256 of "(N, H, W, C)|uint8|" + the pixels in C order (the same pixels
                 hash the same whichever of the two they come from)
  folder         sha256 of every file's name and bytes, in sorted order
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dkdm_cli import _fs
from dkdm_cli.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # torch-fidelity's defaults, non-recursive
LOSSY_SUFFIXES = (".jpg", ".jpeg")
STAT_KEYS = ("mu", "sigma")  # FID statistics, as ADM's reference batches store them
SPATIAL_STAT_KEYS = ("mu_s", "sigma_s")  # sFID statistics


def cache_dir() -> Path:
    """dkdm's cache: DKDM_CACHE_DIR, else the platform's user cache folder."""
    if os.environ.get("DKDM_CACHE_DIR"):
        return Path(os.environ["DKDM_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dkdm"))


def _content_header(shape: tuple[int, ...]) -> bytes:
    return f"{tuple(int(s) for s in shape)}|uint8|".encode()


def to_rgb(batch: np.ndarray) -> np.ndarray:
    """(B, H, W, 1 or 3) uint8 -> (B, H, W, 3), grey replicated as PIL's convert('RGB') does."""
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


def _layout_hint(shape: tuple[int, ...]) -> str:
    return " (channels first? expected N, H, W, C)" if len(shape) == 4 and shape[1] in (1, 3) else ""


def check_images(images: np.ndarray, where: str) -> None:
    """Refuse anything but (N, H, W, 1 or 3) uint8, with the likely fix."""
    if images.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{where}: expected images (N, H, W, 1 or 3), got {images.shape}"
                        f"{_layout_hint(images.shape)}")
    if len(images) < 2:
        raise UserError(f"{where}: at least 2 images are needed, got {len(images)}")


@dataclass
class ImageSet:
    """A set of images to score: a length, RGB batches, a content hash and a description."""

    kind: str  # array | npz | folder
    source: str
    num: int
    shape: tuple[int, int, int]  # (H, W, C) as stored
    info: dict[str, Any] = field(default_factory=dict)
    _array: np.ndarray | None = None
    _files: list[Path] | None = None
    _sha256: str | None = None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """(B, H, W, 3) uint8 batches, in order."""
        if self._array is not None:
            for start in range(0, self.num, batch_size):
                yield to_rgb(self._array[start:start + batch_size])
        elif self._files is not None:
            for start in range(0, self.num, batch_size):
                yield np.stack([_read_image(p, self.shape) for p in self._files[start:start + batch_size]])
        else:
            with _NpzMember(Path(self.source), "arr_0") as (fh, shape, _dtype):
                per_image = int(np.prod(shape[1:]))
                for start in range(0, self.num, batch_size):
                    n = min(batch_size, self.num - start)
                    data = _read_exactly(fh, n * per_image, self.source)
                    yield to_rgb(np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:]))

    @property
    def sha256(self) -> str:
        """The content hash (computed once, streaming)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            if self._array is not None:
                digest.update(_content_header(self._array.shape))
                digest.update(np.ascontiguousarray(self._array).tobytes())
            elif self._files is not None:
                for path in self._files:
                    digest.update(path.name.encode() + b"\0")
                    digest.update(path.read_bytes())
            else:
                with _NpzMember(Path(self.source), "arr_0") as (fh, shape, _dtype):
                    digest.update(_content_header(shape))
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def describe(self) -> dict[str, Any]:
        """JSON-ready description, hash included."""
        return {"kind": self.kind, "source": self.source, "num": self.num,
                "shape": list(self.shape), "sha256": self.sha256, **self.info}


def array_images(images: np.ndarray, *, source: str, info: dict[str, Any] | None = None) -> ImageSet:
    """An in-memory set (e.g. freshly generated samples)."""
    check_images(images, source)
    return ImageSet("array", source, len(images), tuple(images.shape[1:]), dict(info or {}),
                    _array=images)


# What PIL raises for a file that is not an image or is damaged (verify() raises SyntaxError for
# a bad PNG chunk; a decompression bomb is a ValueError subclass in some versions).
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def folder_images(path: Path, *, verify: bool = False) -> ImageSet:
    """The PNG/JPEG files directly inside `path` (sorted by name), all of one size.

    `verify`: check every file now (header, size, and PIL's verify() of its chunks, without
    decoding the pixels), so a damaged image among thousands is refused before any work;
    otherwise only the first is opened and the rest are checked as they are read."""
    try:
        files = sorted(p for p in Path(path).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise UserError(f"{path}: cannot list the folder ({exc.strerror or exc})") from exc
    if len(files) < 2:
        raise UserError(f"{path}: expected at least 2 images ({', '.join(IMAGE_SUFFIXES)}) "
                        f"directly inside, found {len(files)}")
    shape = _image_shape(files[0], verify=verify)
    for file in files[1:] if verify else ():
        _check_size(file, _image_shape(file, verify=True), shape)
    info = {"lossy": True} if any(p.suffix.lower() in LOSSY_SUFFIXES for p in files) else {}
    return ImageSet("folder", str(path), len(files), shape, info, _files=files)


def _image_shape(path: Path, *, verify: bool = False) -> tuple[int, int, int]:
    """(H, W, 3) from an image file's header (and its chunks checked with `verify`)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            shape = (img.height, img.width, 3)
            if verify:
                img.verify()
    except _IMAGE_ERRORS as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc
    return shape


def _check_size(path: Path, got: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if got != shape:
        raise UserError(f"{path}: {got[1]}x{got[0]} differs from the first image's "
                        f"{shape[1]}x{shape[0]}; resize the folder to one size first")


def _read_image(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except _IMAGE_ERRORS as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from exc
    _check_size(path, arr.shape, shape)
    return arr


class _NpzMember:
    """Context manager: (file object positioned at the data, shape, dtype) of an .npz member,
    read through the zip stream without loading it (as ADM's evaluator does)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name

    def __enter__(self):
        try:
            self._zip = zipfile.ZipFile(self.path)
            self._fh = self._zip.open(f"{self.name}.npy")
            version = np.lib.format.read_magic(self._fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            self.__exit__()
            raise UserError(f"{self.path}: cannot read {self.name} ({exc})") from exc
        problem = ("is stored in Fortran order; re-save it with np.ascontiguousarray" if fortran
                   else f"must be uint8 (0..255), got {dtype}" if dtype != np.uint8
                   else f"must be images (N, H, W, 1 or 3), got {tuple(shape)}{_layout_hint(shape)}"
                   if len(shape) != 4 or shape[-1] not in (1, 3) else "")
        if problem:
            self.__exit__()
            raise UserError(f"{self.path}: {self.name} {problem}")
        return self._fh, tuple(shape), dtype

    def __exit__(self, *exc) -> None:
        for name in ("_fh", "_zip"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()


def _read_exactly(fh, size: int, source: str) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise UserError(f"{source}: arr_0 is truncated")
    return data


@dataclass(frozen=True)
class ReferenceStats:
    """Precomputed Frechet statistics: FID (mu, sigma) and optionally sFID (mu_s, sigma_s)."""

    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def read_npz(path: Path) -> tuple[ImageSet | None, ReferenceStats | None]:
    """An .npz's images (`arr_0`) and/or statistics (`mu`, `sigma`[, `mu_s`, `sigma_s`]).

    Read with allow_pickle=False: an object array is refused, never unpickled.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            stats = None
            if set(STAT_KEYS) <= keys or set(SPATIAL_STAT_KEYS) <= keys:
                got = {k: np.asarray(npz[k]) for k in (*STAT_KEYS, *SPATIAL_STAT_KEYS) if k in keys}
                stats = ReferenceStats(got.get("mu"), got.get("sigma"), got.get("mu_s"),
                                       got.get("sigma_s"))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz ({exc})") from exc
    images = None
    if "arr_0" in keys:
        with _NpzMember(path, "arr_0") as (_fh, shape, _dtype):
            images = ImageSet("npz", str(path), int(shape[0]), tuple(shape[1:]))
        if images.num < 2:
            raise UserError(f"{path}: at least 2 images are needed, got {images.num}")
    if images is None and stats is None:
        raise UserError(f"{path}: expected arr_0 (uint8 images, N x H x W x C) and/or FID "
                        f"statistics mu, sigma; found {', '.join(sorted(keys)) or 'nothing'}")
    return images, stats


# -- caches ------------------------------------------------------------------------------------

class FeatureCache:
    """Features per (content hash, extractor weights hash, group) as plain .npy files."""

    VERSION = "1"

    def __init__(self, root: Path, weights_sha256: str) -> None:
        self.root = Path(root) / "eval" / "features"
        self.weights = weights_sha256

    def _path(self, content_sha256: str, group: str) -> Path:
        key = hashlib.sha256(f"{self.VERSION}|{content_sha256}|{self.weights}".encode()).hexdigest()
        return self.root / f"{key[:32]}-{group}.npy"

    def get(self, content_sha256: str, groups: tuple[str, ...], num: int) -> dict[str, np.ndarray] | None:
        """All requested groups, or None when any is missing or does not fit."""
        out = {}
        for group in groups:
            path = self._path(content_sha256, group)
            if not path.is_file():
                return None
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
            if value.ndim != 2 or len(value) != num:
                return None
            out[group] = value
        return out

    def put(self, content_sha256: str, feats: dict[str, np.ndarray]) -> None:
        """Store each group (atomic writes; a failure only costs a recompute next time)."""
        for group, value in feats.items():
            try:
                _fs.atomic_write(self._path(content_sha256, group), lambda fh, v=value: np.save(fh, v))
            except OSError:
                pass


def teacher_identity(spec: str) -> str:
    """What a cached teacher reference depends on besides the spec: for local files and folders
    their sizes and modification times, so a retrained teacher at the same path is not reused."""
    path = Path(spec).expanduser()
    if spec.startswith("py:"):  # your code: the file's stamp (a module: its spec alone)
        from dkdm_cli.teachers.pyfunc import parse_spec

        target = parse_spec(spec)[0]
        path = Path(target).expanduser() if target.endswith(".py") else path
    if not path.exists():
        from dkdm_cli.teachers.builtin import builtin_weights

        shipped = builtin_weights(spec) if "/" not in spec and ":" not in spec else None
        if shipped is None or not shipped.is_file():
            return spec  # a hub teacher: its spec (with @revision when pinned) names it
        path = shipped  # a built-in teacher: retraining it changes its file
    if path.is_file():
        files = [path]
    else:
        ckpts = sorted((path / "checkpoints").glob("ckpt-*.safetensors"))
        files = ckpts[-1:] if ckpts else sorted(p for p in path.rglob("*") if p.is_file())
    stamps = [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files]
    return hashlib.sha256("\n".join([spec, *stamps]).encode()).hexdigest()


def reference_cache_path(key: dict[str, Any]) -> Path:
    """Where teacher reference samples for these settings are kept."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "eval" / "reference" / f"{digest[:32]}.npz"


def store_reference(path: Path, images: np.ndarray, key: dict[str, Any]) -> None:
    """Save teacher samples (arr_0) plus a readable sidecar of the settings that made them."""
    _fs.atomic_write(path, lambda fh: np.savez(fh, arr_0=images))
    _fs.write_text(path.with_suffix(".json"), json.dumps(key, indent=1, sort_keys=True))
