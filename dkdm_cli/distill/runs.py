"""Run-directory bookkeeping: where a run lives, whether it may resume, what it records."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from dkdm_cli import _console, _fs
from dkdm_cli.checkpoint import CONFIG_NAME, Checkpoint, checkpoint_dir, load_latest
from dkdm_cli.config import Config, merge, read_toml
from dkdm_cli.errors import UserError

# Settings that may change when a run is resumed; every other one must match.
RESUMABLE = {
    "distill": {"iterations", "log_every", "save_every", "keep_last", "grid_every", "grid_num",
                "grid_steps", "device", "tensorboard", "compile", "init_batch_size", "run_dir",
                "save_pool"},
    "sample": None, "eval": None, "export": None,  # None: the whole section
}


def teacher_label(spec: str) -> str:
    """A file-name-safe short name for a teacher spec."""
    base = spec[3:] if spec.startswith("hf:") else spec
    base = Path(base.rstrip("/")).name or base
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base.replace(".safetensors", "")).strip("-") or "teacher"


def resolve_run_dir(cfg: Config) -> Path:
    """--run-dir, or runs/<teacher>-<student>."""
    if cfg.distill.run_dir:
        return Path(cfg.distill.run_dir)
    student = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.student.name)
    return Path("runs") / f"{teacher_label(cfg.teacher.name)}-{student}"


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key: old -> new' for every setting that must not change on resume."""
    diffs = []
    for section, values in new.items():
        allowed = RESUMABLE.get(section, set())
        if allowed is None:
            continue
        for key, value in values.items():
            if key in allowed:
                continue
            before = old.get(section, {}).get(key)
            if before != value:
                diffs.append(f"{section}.{key}: {before!r} -> {value!r}")
    return diffs


def prepare_run_dir(run_dir: Path, cfg: Config, *, force: bool, is_main: bool) -> Checkpoint | None:
    """Check the run directory against `cfg` and return the checkpoint to resume from, if any.

    A directory made with a different configuration is refused unless `force`, which starts
    the run over (its checkpoints, metrics and grids are removed).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: exists and is not a folder")
    saved = run_dir / CONFIG_NAME
    if saved.is_file():
        old = merge(Config(), read_toml(saved), source=str(saved)).to_dict()
        diffs = config_differences(old, cfg.to_dict())
        if diffs and not force:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise UserError(
                f"{run_dir} was made with a different configuration ({'; '.join(diffs[:3])}{more}); "
                "pass --force to start it over, or choose another --run-dir"
            )
        if diffs and force and is_main:
            for sub in ("checkpoints", "grids", "tensorboard"):
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            for name in ("metrics.jsonl", "startup.json"):
                (run_dir / name).unlink(missing_ok=True)
    ckpt = load_latest(run_dir, warn=_console.warn) if checkpoint_dir(run_dir).is_dir() else None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(saved)
    return ckpt


def teacher_reference(spec: str) -> str:
    """The teacher spec as stored in checkpoints: local paths made absolute."""
    from dkdm_cli.teachers.spec import classify

    kind = classify(spec)
    if kind in ("model_file", "run_dir", "diffusers_dir", "adm_checkpoint"):
        return str(Path(spec).expanduser().resolve())
    return spec


def checkpoint_doc(cfg: Config, teacher, student, settings) -> dict[str, Any]:
    """The JSON fields that let a checkpoint stand alone as a model (and a teacher)."""
    ref = teacher_reference(cfg.teacher.name)
    return {
        "model": student.spec.to_dict(),
        "diffusion": settings.to_dict(),
        "sample_shape": list(teacher.sample_shape),
        "teacher": ref,
        "autoencoder_from": ref if teacher.autoencoder is not None else None,
        "config": cfg.to_dict(),
    }


def announce(obs, cfg: Config, info, teacher, student, count_parameters) -> None:
    """Tell the user what is about to run (stderr; nothing in --json mode)."""
    d = cfg.distill
    obs.message(
        f"teacher {cfg.teacher.name} ({count_parameters(teacher.model) / 1e6:.2f}M params, "
        f"{'x'.join(map(str, teacher.sample_shape))}, T={teacher.diffusion.num_timesteps}) -> "
        f"student {cfg.student.name} ({count_parameters(student) / 1e6:.2f}M params) on {info.device}"
    )
    if teacher.space_note():  # latent teachers: decode scale and clipping, said once
        obs.message(teacher.space_note())
    obs.message(
        f"mode {d.mode}, effective batch {d.batch_size * info.world_size} "
        f"({info.world_size} process(es) x {d.batch_size}), lr {d.lr:g}, {d.iterations} iterations"
    )


def warn_if_pool_reset(obs, cfg: Config, restored: bool) -> None:
    """The resume is not exact when the pool was not in the checkpoint."""
    if not restored and cfg.distill.mode != "basic":
        _console.warn("the checkpoint holds no state pool (save_pool = false or multi-process): "
                      "the pool was re-initialised, so this resume is not bit-exact")


def write_startup(run_dir: Path, startup: dict[str, Any]) -> None:
    """Record what the pool start-up cost."""
    _fs.write_text(run_dir / "startup.json", json.dumps(startup, indent=1) + "\n")
