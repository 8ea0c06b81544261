"""`[student] init`: start the student from trained weights instead of random ones.

The two-stage few-step recipe needs it (`dkdm distill` makes the small student, then
`--objective consistency` makes it fast), and it is useful on its own (continue a student under
other settings as a new run). The weights come from a dkdm run directory (its EMA weights, the
ones `dkdm sample` uses) or a model file (an export); they must be of exactly the student this
run builds (the same preset, arguments and shape, which the teacher decides), checked before
the run directory is touched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from dkdm_cli.errors import ConfigError


def init_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, model spec as a dict) of the student at `path`: a run directory's EMA weights
    or a model file's weights; a ConfigError naming the path when it is neither."""
    from dkdm_cli.errors import DkdmError
    from dkdm_cli.teachers.spec import load_denoiser

    try:
        denoiser = load_denoiser(Path(path), ema=True, students_only=True)
    except DkdmError as exc:
        raise ConfigError(f"student.init {path}: {exc}") from exc
    spec = getattr(denoiser.model, "spec", None)
    if spec is None:  # pragma: no cover - every dkdm model file and run records its spec
        raise ConfigError(f"student.init {path}: the model records no architecture")
    return denoiser.model.state_dict(), spec.to_dict()


def check_init(path: str, student: nn.Module) -> dict[str, torch.Tensor]:
    """The init weights at `path`, refused unless they fit `student` (built for this run's
    teacher, possibly on the meta device) exactly."""
    state, spec = init_weights(path)
    want = student.spec.to_dict()
    if spec["name"] != want["name"]:
        raise ConfigError(f"student.init {path}: a {spec['name']} student, but this run trains "
                          f"{want['name']}; use a run or export of the same preset")
    if _normal(spec["kwargs"]) != _normal(want["kwargs"]):
        diffs = sorted(k for k in set(spec["kwargs"]) | set(want["kwargs"])
                       if _normal(spec["kwargs"]).get(k) != _normal(want["kwargs"]).get(k))
        what = ", ".join(f"{k} {spec['kwargs'].get(k)!r} vs {want['kwargs'].get(k)!r}" for k in diffs)
        raise ConfigError(f"student.init {path}: built with other arguments than this run's "
                          f"student ({what}); it must come from the same preset for a teacher of "
                          "the same shape")
    return state


def _normal(kwargs: dict) -> dict:
    # JSON round trips turn tuples into lists; compare the values, not the container types.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def few_step_flags(run: Path) -> dict[str, dict]:
    """The settings `dkdm distill --few-step RUN` stands for: the few-step objective, started
    from RUN's student, with RUN's teacher and student preset, the few-step settings
    recommended for that teacher, and the run directory RUN-fast. They sit at the command
    line's level (above the project's dkdm.toml, whose values are for DKDM); the user's own
    flags and --set still win."""
    from dkdm_cli.checkpoint import load_latest
    from dkdm_cli.errors import CheckpointError
    from dkdm_cli.recommended import recommended_for

    run = Path(run)
    try:
        ckpt = load_latest(run, weights=False) if (run / "checkpoints").is_dir() else None
    except CheckpointError as exc:
        raise ConfigError(f"--few-step {run}: {exc}") from exc
    if ckpt is None:
        raise ConfigError(f"--few-step {run}: not a dkdm run directory with a checkpoint (give the "
                          "run a DKDM `dkdm distill` made, e.g. runs/digits-unet-n)")
    config = ckpt.doc.get("config") or {}
    teacher, student = config.get("teacher") or {}, config.get("student") or {}
    if not teacher.get("name") or not student.get("name"):
        raise ConfigError(f"--few-step {run}: its checkpoint records no teacher or student")
    flags = {"teacher": {"name": teacher["name"], "arch": teacher.get("arch") or None,
                         "arch_kwargs": teacher.get("arch_kwargs") or None},
             "student": {"name": student["name"], "kwargs": student.get("kwargs") or None,
                         "init": str(run)},
             "distill": {"objective": "consistency", "run_dir": f"{str(run).rstrip('/')}-fast",
                         "pool_from": str(run)}}
    for section, values in recommended_for(teacher["name"], "consistency", warm_start=True).items():
        flags.setdefault(section, {}).update(values)
    return flags


def saved_pool(cfg, teacher) -> None:
    """Refuse `distill.pool_from` unless its latest checkpoint's saved pool fits this run: the
    same teacher (its states lie on that teacher's chains), the same pool size, and labels
    exactly when the teacher is conditional. Checked before the run directory is touched, from
    the checkpoint's document and tensor header (a pool can be gigabytes)."""
    from dkdm_cli.checkpoint import load_latest
    from dkdm_cli.distill.pool import pool_size
    from dkdm_cli.errors import CheckpointError, ModelFileError
    from dkdm_cli.models.io import safetensors_shapes

    d, run = cfg.distill, Path(cfg.distill.pool_from)
    where = f"distill.pool_from {run}"
    if not d.mode.uses_pool:
        raise ConfigError(f"{where}: mode {d.mode.value} has no pool (use dynamic, shuffle or basic)")
    try:
        ckpt = load_latest(run, weights=False) if (run / "checkpoints").is_dir() else None
        shapes = safetensors_shapes(ckpt.path) if ckpt is not None else {}
    except (CheckpointError, ModelFileError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if ckpt is None:
        raise ConfigError(f"{where}: not a dkdm run directory with a checkpoint")
    if "pool/x" not in shapes:
        raise ConfigError(f"{where}: its checkpoints hold no pool (it ran with save_pool = false)")
    theirs = _teacher_key((ckpt.doc.get("config") or {}).get("teacher") or {})
    if theirs != _teacher_key(dataclasses.asdict(cfg.teacher)):
        raise ConfigError(f"{where}: its pool is of teacher {theirs[0]!r}, this run's is "
                          f"{cfg.teacher.name!r}; a pool holds one teacher's chain states")
    want = pool_size(mode=d.mode.value, rho=d.rho, num_timesteps=teacher.diffusion.num_timesteps,
                     batch_size=d.batch_size)
    if shapes["pool/x"][0] != want:
        raise ConfigError(f"{where}: its pool has {shapes['pool/x'][0]} states, this run's needs "
                          f"{want} (use that run's rho and batch_size)")
    if ("pool/y" in shapes) != bool(teacher.conditional):
        raise ConfigError(f"{where}: its pool {'has' if 'pool/y' in shapes else 'has no'} "
                          "class labels, unlike this run's teacher")


def _teacher_key(teacher: dict) -> tuple:
    """What identifies a teacher in a run's [teacher] section: its spec, preset and overrides."""
    return (teacher.get("name"), teacher.get("arch") or "",
            sorted(_normal(dict(teacher.get("arch_kwargs") or {})).items()))
