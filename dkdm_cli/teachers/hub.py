"""Teachers from the Hugging Face hub: `hf:ORG/NAME[@REVISION]`, downloaded once into the hub's
own cache with huggingface_hub (its progress bar), then read by the diffusers-folder loader.

Offline behaviour, in order:
  * dkdm's offline switch (HF_HUB_OFFLINE or DKDM_OFFLINE, any spelling huggingface_hub accepts;
    see dkdm_cli/_offline.py): the cache only, no network call at all;
  * otherwise a quick reachability check (timeout HF_HUB_ETAG_TIMEOUT, 10 s by default) and, on a
    connection error, the cache only;
  * not cached: OfflineError naming the repo, the cache folder and the alternatives.

What is downloaded: configs, and per component folder (root, unet/, transformer/, vqvae/, vae/) its
diffusion_pytorch_model weights, safetensors when the revision has them, else the `.bin` (read
later with torch.load(weights_only=True)). Never both, never other pipeline parts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from dkdm_cli import _offline
from dkdm_cli.errors import OfflineError, TeacherError
from dkdm_cli.teachers.base import Teacher

# "" = the repo root (google/ddpm-* layout); transformer/ holds a DiTPipeline's denoiser.
COMPONENTS = ("", "unet", "transformer", "vqvae", "vae")
CONFIG_PATTERNS = ["model_index.json", "config.json", "scheduler_config.json",
                   *(f"{part}/*.json" for part in ("unet", "transformer", "scheduler", "vqvae", "vae"))]
_SAFE = "diffusion_pytorch_model*.safetensors*"
_BIN = "diffusion_pytorch_model.bin*"
IGNORE_PATTERNS = ["*.fp16.*", "*non_ema*"]
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _in(part: str, pattern: str) -> str:
    return f"{part}/{pattern}" if part else pattern


def allow_patterns(repo_files: Iterable[str] | None = None) -> list[str]:
    """What to download. With the revision's file list: per component, safetensors if it has any,
    else `.bin`. Without it (offline, reading the cache): both, whichever is there."""
    patterns = list(CONFIG_PATTERNS)
    files = None if repo_files is None else set(repo_files)
    for part in COMPONENTS:
        prefix = f"{part}/" if part else ""
        names = None if files is None else {f[len(prefix):] for f in files
                                            if f.startswith(prefix) and "/" not in f[len(prefix):]}
        if names is None:
            patterns += [_in(part, _SAFE), _in(part, _BIN)]
            continue
        weights = [n for n in names if n.startswith("diffusion_pytorch_model")]
        if any(".safetensors" in n for n in weights):
            patterns.append(_in(part, _SAFE))
        elif weights:
            patterns.append(_in(part, _BIN))
    return patterns


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
    """Whether a snapshot of this revision (default main) with weights is cached; no network."""
    folder = repo_cache_folder(repo_id)
    revision = revision or "main"
    commit = revision
    if not _COMMIT_RE.match(revision):
        ref = folder / "refs" / revision
        if not ref.is_file():
            return False
        commit = ref.read_text().strip()
    snapshot = folder / "snapshots" / commit
    return snapshot.is_dir() and any(p.name.startswith("diffusion_pytorch_model")
                                     for p in snapshot.rglob("*") if p.is_file() or p.is_symlink())


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
    reason = _offline.offline_reason()
    local_only, repo_files = reason is not None, None
    if not local_only:
        try:  # fail fast: snapshot_download's own metadata call has no timeout
            info = HfApi().repo_info(repo_id, revision=revision,
                                     timeout=float(constants.HF_HUB_ETAG_TIMEOUT))
            repo_files = [s.rfilename for s in (getattr(info, "siblings", None) or [])] or None
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
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=str(cache),
                  allow_patterns=allow_patterns(repo_files), ignore_patterns=IGNORE_PATTERNS)
    try:
        path = snapshot_download(local_files_only=local_only, etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                                 **kwargs)
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
