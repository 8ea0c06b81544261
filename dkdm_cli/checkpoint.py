"""Run directories and checkpoints.

A run directory holds:
  config.resolved.toml       the configuration the run was last started with (for people; the
                             checkpoints carry their own copy, which resuming checks against)
  checkpoints/ckpt-NNNNNNNN.safetensors
  metrics.jsonl, startup.json, grids/, tensorboard/, export/
  .dkdm.lock                 held by the distill process using the directory (distill/lock.py)

A checkpoint is ONE safetensors file, written atomically (temp file + fsync + rename), read
without pickle. Tensors: `student/*`, `ema/*`, `optim/<i>/<name>`, `rng/*` and optionally
`pool/x`, `pool/t`. Header metadata `dkdm` is a JSON document: format, versions, step, the
student's ModelSpec, the teacher's spec and diffusion settings, the resolved config, the
optimizer's param groups, EMA bookkeeping and whether the pool is inside.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import __version__
from dkdm_cli.errors import CheckpointError, ModelFileError, UserError, from_os_error
from dkdm_cli.models import ModelSpec, build_from_spec
from dkdm_cli.models.io import atomic_save_safetensors, load_state_strict, read_safetensors

FORMAT = "dkdm-checkpoint"
FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^ckpt-(\d{8})\.safetensors$")
CONFIG_NAME = "config.resolved.toml"


@dataclass
class Checkpoint:
    """A checkpoint read back: its tensors grouped by prefix, and its JSON document."""

    path: Path
    doc: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        """Iterations completed when it was written."""
        return int(self.doc["step"])

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix/`, with the prefix stripped."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def has_pool(self) -> bool:
        """Whether the state pool is stored."""
        return "pool/x" in self.tensors


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The file name of the checkpoint at `step`."""
    return checkpoint_dir(run_dir) / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if CKPT_RE.match(p.name))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as flat tensors plus JSON-ready param groups (no pickle needed)."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim/{idx}/{name}"] = t
    return tensors, sd["param_groups"]


def restore_optimizer(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load an optimizer's state from a checkpoint written by `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.group("optim").items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": ckpt.doc["optim_param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not fit this student ({exc})") from exc


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    """Atomically write a checkpoint; on failure the previous checkpoints are untouched."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, "dkdm_version": __version__, **doc}
    try:
        atomic_save_safetensors(tensors, Path(path), {"dkdm": json.dumps(full)})
    except OSError as exc:
        raise from_os_error(exc) from exc


def read_checkpoint(path: Path, *, weights: bool = True) -> Checkpoint:
    """Read and validate one checkpoint file (`weights=False`: its document only, no tensors)."""
    try:
        tensors, meta = read_safetensors(Path(path), weights=weights)
    except ModelFileError as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?)") from exc
    try:
        doc = json.loads(meta["dkdm"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} has no valid dkdm metadata") from exc
    if doc.get("format") != FORMAT or doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: unsupported format {doc.get('format')!r}")
    return Checkpoint(path=Path(path), doc=doc, tensors=tensors)


def load_latest(run_dir: Path, *, warn=None, weights: bool = True) -> Checkpoint | None:
    """The newest readable checkpoint of a run; unreadable newer ones are skipped with a warning
    naming them. None when the run has no checkpoint at all. `weights=False`: documents only."""
    paths = list_checkpoints(run_dir)
    errors = []
    for path in reversed(paths):
        try:
            ckpt = read_checkpoint(path, weights=weights)
        except CheckpointError as exc:
            errors.append(str(exc))
            if warn is not None:
                warn(f"{exc}; falling back to the previous checkpoint")
            continue
        return ckpt
    if errors:
        raise CheckpointError(f"no readable checkpoint in {run_dir}: {errors[-1]}")
    return None


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a dkdm run directory (its config record or a checkpoint inside)."""
    path = Path(path)
    return (path / CONFIG_NAME).is_file() or bool(list_checkpoints(path))


def _is_checkpoint_file(path: Path) -> bool:
    if CKPT_RE.match(path.name):
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        _, meta = read_safetensors(path, weights=False)
        return json.loads(meta.get("dkdm", "{}")).get("format") == FORMAT
    except (ModelFileError, json.JSONDecodeError, AttributeError):
        return False


def refuse_run_internals(path: Path, *, flag: str) -> None:
    """UserError when writing `path` could damage a run: it lies inside a run's checkpoints/
    folder, or it is an existing checkpoint file. (export, sample and eval call this.)"""
    p = Path(path).expanduser().absolute()
    for folder in (p, *p.parents):
        if folder.name == "checkpoints" and is_run_dir(folder.parent):
            raise UserError(f"{flag} {path}: inside the run's checkpoints folder {folder}, which "
                            "holds only the run's own checkpoints; choose another path")
    if p.is_file() and _is_checkpoint_file(p):
        raise UserError(f"{flag} {path}: is a dkdm checkpoint; writing there would destroy it. "
                        "Choose another path")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    paths = list_checkpoints(run_dir)
    for path in paths[: max(0, len(paths) - keep)]:
        path.unlink(missing_ok=True)


def student_from_checkpoint(ckpt: Checkpoint, *, ema: bool = True) -> nn.Module:
    """The student (EMA weights by default) rebuilt from a checkpoint, strictly."""
    model = build_from_spec(ModelSpec.from_dict(ckpt.doc["model"]))
    load_state_strict(model, ckpt.group("ema" if ema else "student"), source=str(ckpt.path))
    return model


def student_from_run(run_dir: Path, *, ema: bool = True) -> tuple[nn.Module, Checkpoint]:
    """(student, checkpoint) from the newest readable checkpoint of a run directory."""
    ckpt = load_latest(Path(run_dir))
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: the run has no checkpoint yet")
    return student_from_checkpoint(ckpt, ema=ema), ckpt
