"""Public pretrained teachers, registered by name (`dkdm teachers`).

Hub teachers live in the Hugging Face cache; direct-link checkpoints are downloaded once into
platformdirs' user cache (`<cache>/dkdm/teachers`, e.g. ~/.cache/dkdm/teachers on Linux) with a
progress bar. A direct file's sha256 is checked against the published value where one is known;
otherwise the hash of the first download is stored beside it (`<file>.sha256`) and every later
load is checked against that, so a truncated or replaced file is caught. `is_cached` never touches
the network.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

from dkdm_cli import _fs, _offline
from dkdm_cli.errors import ModelFileError, OfflineError
from dkdm_cli.teachers.base import Teacher, TeacherEntry
from dkdm_cli.teachers.registry import register_teacher

_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 30.0


def teachers_cache_dir() -> Path:
    """Where direct-link teacher checkpoints are kept."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("dkdm")) / "teachers"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_file(path: Path, sha256: str | None = None) -> None:
    """Check `path` against the known hash, else its sidecar (written on first sight)."""
    sidecar = _sidecar(path)
    expected = sha256 or (sidecar.read_text().split()[0] if sidecar.is_file() else None)
    actual = _sha256(path)
    if expected is None:
        _fs.write_text(sidecar, f"{actual}  {path.name}\n")
        return
    if actual != expected:
        raise ModelFileError(
            f"{path}: sha256 {actual[:12]}... does not match the expected {expected[:12]}...; the "
            "file is corrupt or was replaced. Delete it (and its .sha256) to download it again"
        )


def download_once(url: str, dest: Path, *, sha256: str | None = None) -> Path:
    """`dest`, downloading `url` there first if it is missing; hash-checked either way."""
    dest = Path(dest)
    if dest.is_file():
        verify_file(dest, sha256)
        return dest
    reason = _offline.offline_reason()
    if reason:
        raise OfflineError(f"{dest.name} is not cached and dkdm is offline ({reason}); "
                           f"put the file from {url} at {dest}")
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from dkdm_cli import _console

    digest = hashlib.sha256()
    try:
        with _fs.atomic_path(dest) as tmp, open(tmp, "wb") as out, \
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                       TransferSpeedColumn())
            with Progress(*columns, console=_console.err, transient=True) as progress:
                task = progress.add_task(f"downloading {dest.name}", total=total)
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
            out.flush()
            actual = digest.hexdigest()
            if sha256 and actual != sha256:
                raise ModelFileError(f"{url}: downloaded file has sha256 {actual}, expected {sha256}")
        _fs.write_text(_sidecar(dest), f"{actual}  {dest.name}\n")
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise OfflineError(f"cannot download {url} ({exc}); put the file at {dest}, or pass any "
                           "local copy as the teacher spec") from exc
    return dest


# -- the registered teachers ------------------------------------------------------------------

def _hub_entry(name: str, repo: str, description: str, *, size: int, channels: int,
               parameters: int | None, latent: bool = False, revision: str | None = None,
               weights: str = "", decode_scale: float | None = None,
               decode_note: str = "", num_classes: int = 0,
               null_class: int | None = None, license: str = "") -> TeacherEntry:
    from dkdm_cli.teachers.hub import is_hub_cached, load_hub_teacher

    spec = f"{repo}@{revision}" if revision else repo

    def load(device: str = "cpu") -> Teacher:
        return load_hub_teacher(spec, device=device, name=name)

    return TeacherEntry(name=name, source=f"hf:{repo}", description=description, image_size=size,
                        channels=channels, parameters=parameters, load=load,
                        is_cached=partial(is_hub_cached, repo, revision), latent=latent,
                        revision=revision, weights=weights, decode_scale=decode_scale,
                        decode_note=decode_note, num_classes=num_classes, null_class=null_class,
                        license=license)


def _direct_entry(name: str, url: str, arch: str, description: str, *, size: int,
                  parameters: int, sha256: str | None = None, num_classes: int = 0) -> TeacherEntry:
    def path() -> Path:
        return teachers_cache_dir() / url.rsplit("/", 1)[1]

    def load(device: str = "cpu") -> Teacher:
        from dkdm_cli.teachers.adm import load_adm_teacher

        teacher = load_adm_teacher(download_once(url, path(), sha256=sha256), arch=arch, device=device)
        teacher.name, teacher.source = name, url
        return teacher

    is_cached: Callable[[], bool] = lambda: path().is_file()  # noqa: E731
    return TeacherEntry(name=name, source=url, description=description, image_size=size,
                        channels=3, parameters=parameters, load=load, is_cached=is_cached,
                        weights=".pt state dict read with torch.load(weights_only=True), sha256-checked",
                        num_classes=num_classes)


_OPENAI = "https://openaipublic.blob.core.windows.net/diffusion"
IDDPM_CIFAR10_URL = f"{_OPENAI}/march-2021/cifar10_uncond_50M_500K.pt"
# The class-conditional ImageNet checkpoints the two READMEs link (no published sha256: the hash
# of the first download is kept and checked, see the module docstring).
IDDPM_IMAGENET64_COND_URL = f"{_OPENAI}/march-2021/imagenet64_cond_270M_250K.pt"
ADM_COND_URLS = {size: f"{_OPENAI}/jul-2021/{size}x{size}_diffusion.pt" for size in (64, 128, 256)}
_PR_SAFETENSORS = ("safetensors from {rev} (the hub's safetensors conversion of main's weights; "
                   "main has only diffusion_pytorch_model.bin)")
_BIN_ONLY = ("diffusion_pytorch_model.bin from main (no safetensors known), read with "
             "torch.load(weights_only=True)")
_EITHER = ("main's diffusion_pytorch_model.safetensors where the revision has them, else its .bin "
           "read with torch.load(weights_only=True)")
_NO_NULL = "; 1000 ImageNet classes, no null class (no --cfg)"
# What the repository's model card declares (its README's `license:`), checked for these two.
_APACHE = "apache-2.0"

# Parameter counts are exact: tests rebuild each architecture on the meta device from the hub's
# own config files (tests/fixtures/hub/) and each ADM preset from its flags.
for _entry in (
    _hub_entry("ddpm-cifar10", "google/ddpm-cifar10-32",
               "DDPM (Ho et al.) CIFAR-10 32x32, linear T=1000, eps, fixed-large variance",
               size=32, channels=3, parameters=35_746_307, revision="refs/pr/14",
               weights=_PR_SAFETENSORS.format(rev="refs/pr/14"), license=_APACHE),
    _hub_entry("ddpm-celebahq", "google/ddpm-ema-celebahq-256",
               "DDPM (Ho et al.) CelebA-HQ 256x256 (EMA weights), linear T=1000, eps",
               size=256, channels=3, parameters=113_673_219, weights=_BIN_ONLY),
    _hub_entry("ldm-celebahq", "CompVis/ldm-celebahq-256",
               "LDM-VQ-f4 CelebA-HQ 256x256: 64x64x3 latents, T=1000, eps (the paper's latent teacher)",
               size=64, channels=3, parameters=274_056_163, latent=True, revision="refs/pr/7",
               weights=_PR_SAFETENSORS.format(rev="refs/pr/7"), decode_scale=1.0, license=_APACHE,
               decode_note="vqvae/config.json has no scaling_factor: LDM's VQ-f4 autoencoder was "
                           "trained at scale 1 (diffusers' VQModel default 0.18215 would be wrong)"),
    _hub_entry("dit-xl2-256", "facebook/DiT-XL-2-256",
               "DiT-XL/2 ImageNet 256x256, class-conditional (1000 classes + null for CFG): "
               "32x32x4 latents, linear T=1000, eps, learned variance",
               size=32, channels=4, parameters=749_826_464, latent=True, weights=_EITHER,
               decode_scale=0.18215, num_classes=1000, null_class=1000,
               decode_note="DiT's factor (its sample.py decodes samples / 0.18215); the hub's DiT "
                           "pipelines were converted before diffusers' AutoencoderKL configs carried "
                           "scaling_factor, and a missing key in a DiTPipeline means 0.18215"),
    _direct_entry("iddpm-cifar10", IDDPM_CIFAR10_URL, "iddpm-cifar10",
                  "Improved DDPM CIFAR-10 32x32 (cifar10_uncond_50M_500K), cosine T=4000, learned variance",
                  size=32, parameters=52_546_438),
    _direct_entry("iddpm-imagenet64-cond", IDDPM_IMAGENET64_COND_URL, "iddpm-imagenet64-cond",
                  "Improved DDPM ImageNet 64x64 class-conditional (imagenet64_cond_270M_250K), cosine "
                  "T=4000, learned variance" + _NO_NULL,
                  size=64, parameters=273_049_350, num_classes=1000),
    _direct_entry("adm-64-cond", ADM_COND_URLS[64], "adm-64-cond",
                  "ADM (guided-diffusion) ImageNet 64x64 class-conditional (64x64_diffusion), cosine "
                  "T=1000, learned variance" + _NO_NULL,
                  size=64, parameters=295_904_454, num_classes=1000),
    _direct_entry("adm-128-cond", ADM_COND_URLS[128], "adm-128-cond",
                  "ADM (guided-diffusion) ImageNet 128x128 class-conditional (128x128_diffusion), "
                  "linear T=1000, learned variance" + _NO_NULL,
                  size=128, parameters=421_529_606, num_classes=1000),
    _direct_entry("adm-256-cond", ADM_COND_URLS[256], "adm-256-cond",
                  "ADM (guided-diffusion) ImageNet 256x256 class-conditional (256x256_diffusion), "
                  "linear T=1000, learned variance" + _NO_NULL,
                  size=256, parameters=553_838_086, num_classes=1000),
):
    register_teacher(_entry)
