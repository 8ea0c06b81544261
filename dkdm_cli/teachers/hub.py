"""Teachers from the Hugging Face hub: `hf:ORG/NAME[@REVISION]`, downloaded once into the hub's
own cache with huggingface_hub (its progress bar), then read by the diffusers-folder loader.

Offline behaviour, in order:
  * offline (DKDM_OFFLINE or HF_HUB_OFFLINE set, see dkdm_cli/_offline.py): the cache only, no
    network call at all;
  * otherwise a quick reachability check (timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) and, on a
    connection error, the cache only;
  * not cached: OfflineError naming the repo, the cache folder and the alternatives.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dkdm_cli._offline import is_offline, which
from dkdm_cli.errors import OfflineError, TeacherError
from dkdm_cli.teachers.base import Teacher

# Only what a diffusers UNet (+ scheduler, + autoencoder) teacher needs: configs and safetensors;
# a component that has no safetensors then gets its diffusion_pytorch_model.bin (checked to hold
# only tensors before it is read). Other pipeline parts (text encoders, ...) are never downloaded.
ALLOW_PATTERNS = [
    "model_index.json", "config.json", "scheduler_config.json", "diffusion_pytorch_model*.safetensors*",
    *(f"{part}/*.json" for part in ("unet", "scheduler", "vqvae", "vae")),
    *(f"{part}/*.safetensors" for part in ("unet", "vqvae", "vae")),
]
IGNORE_PATTERNS = ["*.fp16.*", "*non_ema*"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def parse_repo(spec: str) -> tuple[str, str | None]:
    """'ORG/NAME[@REVISION]' (without 'hf:') -> (repo_id, revision or None)."""
    repo_id, at, revision = spec.partition("@")
    if not _REPO_RE.match(repo_id) or ".." in repo_id or (at and not revision):
        raise TeacherError(f"hf:{spec}: expected hf:ORG/NAME or hf:ORG/NAME@REVISION")
    return repo_id, revision or None


def hub_cache_dir() -> Path:
    """The hub cache folder, from HF_HUB_CACHE or HF_HOME as set now, else the hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    """Where the hub keeps a model repo: <cache>/models--ORG--NAME."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def is_hub_cached(repo_id: str, revision: str | None = None) -> bool:
    """Whether a snapshot of this revision (default main) with safetensors is cached; no network."""
    folder = repo_cache_folder(repo_id)
    revision = revision or "main"
    commit = revision
    if not _COMMIT_RE.match(revision):
        ref = folder / "refs" / revision
        if not ref.is_file():
            return False
        commit = ref.read_text().strip()
    snapshot = folder / "snapshots" / commit
    return snapshot.is_dir() and any(snapshot.rglob("*.safetensors"))


def _network_errors() -> tuple[type[BaseException], ...]:
    # What a failed connection raises, whichever HTTP stack this huggingface_hub version uses.
    import importlib

    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _offline_error(repo_id: str, revision: str | None, reason: str) -> OfflineError:
    rev = f"@{revision}" if revision else ""
    return OfflineError(
        f"hf:{repo_id}{rev} is not in the local Hugging Face cache ({hub_cache_dir()}) and {reason}. "
        f"Fetch it once where there is network (any dkdm command with hf:{repo_id}, or "
        f"`hf download {repo_id}`), then copy its folder models--{repo_id.replace('/', '--')} into "
        "that cache (or point HF_HUB_CACHE at a copy); or save the pipeline to a folder and pass "
        "that path as the teacher (./folder)"
    )


def bin_patterns(folder: Path) -> list[str]:
    """`diffusion_pytorch_model.bin` of every component (root, unet/, vqvae/, vae/) that has a
    config but no safetensors weights in the snapshot."""
    out = []
    for sub in ("", "unet", "vqvae", "vae"):
        component = folder / sub if sub else folder
        if not (component / "config.json").is_file():
            continue
        if not any(component.glob("diffusion_pytorch_model*.safetensors")):
            out.append(f"{sub}/diffusion_pytorch_model.bin" if sub else "diffusion_pytorch_model.bin")
    return out


def download_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot folder of a hub repo, downloading what is missing when online."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache),
                  allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    local_only = is_offline()
    reason = f"{which()} is set"
    if not local_only:
        try:  # fail fast: snapshot_download's own metadata call has no timeout
            HfApi().repo_info(repo_id, revision=revision, timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
        except GatedRepoError as exc:
            raise TeacherError(f"hf:{repo_id} is gated: accept its terms on the hub and "
                               "log in (`hf auth login`)") from exc
        except RepositoryNotFoundError as exc:
            raise TeacherError(f"hf:{repo_id}: no such model repository on the hub (or it is "
                               "private: log in with `hf auth login`)") from exc
        except RevisionNotFoundError as exc:
            raise TeacherError(f"hf:{repo_id}: no revision {revision!r} on the hub") from exc
        except _network_errors() as exc:
            local_only, reason = True, f"the hub cannot be reached ({type(exc).__name__})"
    try:
        path = snapshot_download(local_files_only=local_only, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                                 **kwargs)
        bins = bin_patterns(Path(path))
        if bins:  # published with pickled .bin weights only (the google/ddpm-*, CompVis/ldm-* repos)
            path = snapshot_download(local_files_only=local_only,
                                     etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                                     **(kwargs | {"allow_patterns": bins}))
    except LocalEntryNotFoundError as exc:
        raise _offline_error(repo_id, revision, reason) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise TeacherError(f"hf:{repo_id}: {exc}") from exc
    except _network_errors() as exc:
        raise _offline_error(repo_id, revision, f"the download failed ({exc})") from exc
    return Path(path)


def load_hub_teacher(spec: str, *, device: str = "cpu", name: str | None = None) -> Teacher:
    """A teacher from `ORG/NAME[@REVISION]` (the part after 'hf:') in diffusers format."""
    from dkdm_cli.teachers.diffusers_folder import load_diffusers_teacher

    repo_id, revision = parse_repo(spec)
    folder = download_snapshot(repo_id, revision)
    teacher = load_diffusers_teacher(folder, device=device, name=name or repo_id.split("/")[1],
                                     source=f"hf:{spec}")
    teacher.info["snapshot"] = folder.name
    return teacher
