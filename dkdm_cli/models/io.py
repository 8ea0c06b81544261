"""The project's model file: one safetensors file whose header metadata holds a JSON document
(format version, package version, the ModelSpec, and for teachers the diffusion settings).

Loading never unpickles, and a missing or unexpected weight is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dkdm_cli import __version__, _fs
from dkdm_cli.errors import DkdmError, ModelFileError
from dkdm_cli.models import ModelSpec, build_from_spec
from dkdm_cli.tensorfile import refuse_lfs_pointer

FORMAT = "dkdm-model"
FORMAT_VERSION = 1
META_KEY = "dkdm"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (see `_fs.atomic_path`). If anything fails, disk
    full included, `path` is untouched; I/O failures are raised as OSError."""
    path = Path(path)
    with _fs.atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                      metadata=metadata)
        except SafetensorError as exc:
            raise _fs.safetensors_os_error(exc, path) from exc


def read_safetensors(path: Path, *, weights: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file (no tensors with weights=False); a clear
    ModelFileError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    refuse_lfs_pointer(path, what="safetensors file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if weights else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, meta


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a safetensors file's tensors, read from its header (no tensor data)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                      assign: bool = False) -> None:
    """load_state_dict(strict) with an error naming missing/unexpected/mis-shaped keys
    (`assign=True` for a model built on the meta device: the tensors become its parameters)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise ModelFileError(f"{source}: weights do not match the architecture; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=assign)


def save_model(model: nn.Module, path: Path, *, extra: dict[str, Any] | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """Save `model` (which must carry `.spec`) with optional extra document fields (e.g.
    diffusion) and header `metadata` beside dkdm's own entry (e.g. {"format": "pt"})."""
    model = getattr(model, "_orig_mod", model)  # never save a compiled wrapper's prefixes
    spec: ModelSpec | None = getattr(model, "spec", None)
    if spec is None:
        # Without a spec the file could not be rebuilt; only create_model attaches one.
        raise ValueError("model has no .spec; build it with dkdm_cli.models.create_model")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "dkdm_version": __version__,
           "model": spec.to_dict(), **(extra or {})}
    state = {k: v for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, Path(path), {**(metadata or {}), META_KEY: json.dumps(doc)})


def read_model_doc(path: Path) -> dict[str, Any]:
    """The JSON document of a model file, without reading the weights."""
    _, meta = read_safetensors(Path(path), weights=False)
    return _parse_doc(meta, Path(path))


def _parse_doc(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The validated JSON document stored under META_KEY."""
    if META_KEY not in meta:
        raise ModelFileError(f"{path}: not a dkdm model file (no '{META_KEY}' metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: corrupt dkdm metadata ({exc})") from exc
    if not isinstance(doc, dict):
        raise ModelFileError(f"{path}: corrupt dkdm metadata (not a JSON object)")
    version = doc.get("format_version")
    if doc.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: unsupported model format {doc.get('format')} v{version}; "
            f"this dkdm reads {FORMAT} up to v{FORMAT_VERSION} (a newer file needs a newer dkdm)"
        )
    if not isinstance(doc.get("model"), dict):
        raise ModelFileError(f"{path}: corrupt dkdm metadata (no model description)")
    return doc


def load_model(path: Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model, document) from a model file; strict, pickle-free."""
    tensors, meta = read_safetensors(Path(path))
    doc = _parse_doc(meta, Path(path))
    try:
        model = build_from_spec(ModelSpec.from_dict(doc["model"]))
    except KeyError as exc:
        raise ModelFileError(f"{path}: model metadata lacks {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: corrupt model metadata ({exc})") from exc
    except DkdmError as exc:
        # e.g. a registry name this version does not know: say which file asked for it.
        raise ModelFileError(f"{path}: {exc}") from exc
    load_state_strict(model, tensors, source=str(path))
    return model.to(device), doc
