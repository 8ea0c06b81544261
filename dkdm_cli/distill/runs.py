"""Run-directory bookkeeping: where a run lives, whether it may resume, what it records."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkdm_cli import _console, _fs
from dkdm_cli.checkpoint import CONFIG_NAME, Checkpoint, checkpoint_dir, load_latest
from dkdm_cli.config import Config, Objective, merge, read_toml
from dkdm_cli.distill.lock import RunLock
from dkdm_cli.errors import CheckpointError, ConfigError, UserError

# Settings that may change when a run is resumed; every other one must match.
RESUMABLE = {
    # Where and how fast a run executes may change (e.g. resumed on another machine, whose
    # "auto" precision differs); what it learns may not.
    "distill": {"iterations", "log_every", "save_every", "keep_last", "grid_every", "grid_num",
                "grid_steps", "device", "tensorboard", "compile", "init_batch_size", "run_dir",
                "save_pool", "precision", "teacher_precision"},
    "sample": None, "eval": None, "export": None,  # None: the whole section
}


def teacher_label(spec: str) -> str:
    """A file-name-safe short name for a teacher spec."""
    if spec.startswith("py:"):  # py:dir/my_ddpm.py:teacher -> my_ddpm-teacher
        from dkdm_cli.teachers.pyfunc import parse_spec

        target, function = parse_spec(spec)
        stem = Path(target).stem if target.endswith(".py") else target.rsplit(".", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{stem}-{function}")
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


def check_run_dir_path(run_dir: Path) -> None:
    """Refuse a --run-dir that cannot be a folder (it, or a parent, is a file)."""
    _fs.check_target(run_dir, flag="--run-dir", folder=True)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest readable checkpoint (unreadable newer ones skipped with a warning)."""
    return load_latest(run_dir, warn=_console.warn) if checkpoint_dir(run_dir).is_dir() else None


def saved_config(ckpt: Checkpoint, run_dir: Path) -> dict[str, Any]:
    """The configuration a checkpoint was written under (its own record; older checkpoints:
    the run's config.resolved.toml)."""
    raw = ckpt.doc.get("config")
    if not isinstance(raw, dict):
        raw = read_toml(run_dir / CONFIG_NAME) if (run_dir / CONFIG_NAME).is_file() else {}
    try:
        return merge(Config(), raw, source=str(ckpt.path)).to_dict()
    except ConfigError:  # written by another version: compare what is there
        return raw


def backup_path(run_dir: Path) -> Path:
    """The first free `<run_dir>.bak-N` beside the run directory."""
    n = 1
    while (candidate := run_dir.with_name(f"{run_dir.name}.bak-{n}")).exists():
        n += 1
    return candidate


def move_aside(run_dir: Path) -> Path:
    """Rename the whole run directory to `<run_dir>.bak-N`; returns where it went."""
    here = Path.cwd().resolve()
    if run_dir.resolve() == here or run_dir.resolve() in here.parents:
        raise UserError(f"--force would move {run_dir} aside, but it is the current folder (or "
                        "holds it); run the command from outside it")
    dest = backup_path(run_dir)
    run_dir.rename(dest)
    return dest


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line: 0 for a record without one (kept, as before), None
    for a line that is not a record with an integer step (cut short by a kill, or edited)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the metrics.jsonl records up to `step`, so a resumed run logs each step once
    (a killed run may have logged past its last checkpoint). Unreadable lines are dropped with a
    warning naming them; every readable record is kept."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    keep, bad = [], []
    for number, line in enumerate(lines, 1):
        at = _record_step(line)
        if at is None:
            if line.strip():
                bad.append(number)
        elif at <= step:
            keep.append(line)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        _console.warn(f"{path}: dropped unreadable line(s) {shown}; kept the {len(keep)} "
                      f"readable record(s) up to step {step}")
    # A last line without its newline would run into the next record appended.
    if len(keep) != len(lines) or (text and not text.endswith("\n")):
        _fs.write_text(path, "".join(f"{line}\n" for line in keep))


@dataclass
class OpenedRun:
    """A locked run directory and the checkpoint to resume from (None: a fresh start)."""

    lock: RunLock
    checkpoint: Checkpoint | None
    moved_to: Path | None = None


def open_run_dir(run_dir: Path, cfg: Config, *, force: bool, say=None,
                 runtime: dict[str, Any] | None = None) -> OpenedRun:
    """Lock the run directory and decide: resume, start fresh, or (with `force`, when the
    configuration differs) move the old run aside to `<run_dir>.bak-N` and start fresh.

    Differences are checked against the newest checkpoint's own configuration: a directory
    without a checkpoint has nothing to lose, so a failed first try never locks it. Leftovers
    of a killed save are removed; metrics.jsonl is cut back to the checkpoint's step.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        for folder in (run_dir, checkpoint_dir(run_dir), run_dir / "grids", run_dir / "export"):
            _fs.remove_stale_temps(folder)
        moved = None
        try:
            ckpt = latest_checkpoint(run_dir)
            diffs = config_differences(saved_config(ckpt, run_dir), cfg.to_dict()) if ckpt else []
        except CheckpointError as exc:
            if not force:
                raise CheckpointError(f"{exc}; pass --force to move this run aside (to "
                                      f"{backup_path(run_dir)}) and start over") from exc
            ckpt, diffs = None, ["unreadable checkpoints"]
        if diffs and not force:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise UserError(
                f"{run_dir} holds a run made with a different configuration "
                f"({'; '.join(diffs[:3])}{more}); pass --force to move it aside to "
                f"{backup_path(run_dir)} and start over, or choose another --run-dir")
        if diffs:
            moved = move_aside(run_dir)
            run_dir.mkdir(parents=True)
            old, lock = lock, RunLock(run_dir).acquire()
            old.release()
            ckpt = None
            if say is not None:
                say(f"moved the previous run to {moved} (undo: rm -r {run_dir} && mv {moved} "
                    f"{run_dir})")
        truncate_metrics(run_dir, ckpt.step if ckpt is not None else 0)
        cfg.save(run_dir / CONFIG_NAME, notes=runtime_notes(runtime) if runtime else None)
        return OpenedRun(lock=lock, checkpoint=ckpt, moved_to=moved)
    except BaseException:
        lock.release()
        raise


def runtime_notes(runtime: dict[str, Any]) -> list[str]:
    """Comment lines for config.resolved.toml: what the "auto" settings resolved to here."""
    return ["What ran on this machine (the settings above resolved; comments, not settings):",
            *(f"  {key}: {value}" for key, value in runtime.items())]


def teacher_reference(spec: str) -> str:
    """The teacher spec as stored in checkpoints: local paths made absolute."""
    from dkdm_cli.teachers.spec import classify

    kind = classify(spec)
    if kind in ("model_file", "run_dir", "dkdm_export", "diffusers_dir", "adm_checkpoint"):
        return str(Path(spec).expanduser().resolve())
    if kind == "py":
        from dkdm_cli.teachers.pyfunc import canonical_spec

        return canonical_spec(spec)
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
        "sampler": run_sampler(cfg, teacher.diffusion.num_timesteps),
    }


def run_sampler(cfg: Config, num_timesteps: int) -> dict[str, Any] | None:
    """How the run's student samples when the user names no sampler: None (the teachers' own
    samplers apply), or for a few-step student multistep consistency sampling from its top."""
    from dkdm_cli.diffusion.consistency import default_top

    if cfg.distill.objective is not Objective.CONSISTENCY:
        return None
    return {"name": "consistency", "top": default_top(num_timesteps)}


def announce(obs, cfg: Config, info, teacher, student, count_parameters,
             runtime: dict[str, Any] | None = None) -> None:
    """Tell the user what is about to run (stderr; nothing in --json mode)."""
    d = cfg.distill
    obs.message(
        f"teacher {cfg.teacher.name} ({count_parameters(teacher.model) / 1e6:.2f}M params, "
        f"{'x'.join(map(str, teacher.sample_shape))}, T={teacher.diffusion.num_timesteps}) -> "
        f"student {cfg.student.name} ({count_parameters(student) / 1e6:.2f}M params) on {info.device}"
    )
    if teacher.space_note():  # latent teachers: decode scale and clipping, said once
        obs.message(teacher.space_note())
    if teacher.conditional:
        null = (f"null class {teacher.null_class} on {d.cfg_dropout:.0%} of states"
                if teacher.null_class is not None else "no null class (no guidance)")
        guide = f", guided targets at scale {d.guidance_scale:g}" if d.guidance_scale != 1 else ""
        obs.message(f"class-conditional: {teacher.num_classes} classes, {null}{guide}")
    obs.message(
        f"mode {d.mode}, effective batch {d.batch_size * info.world_size} "
        f"({info.world_size} process(es) x {d.batch_size}), lr {d.lr:g}, {d.iterations} iterations"
    )
    if d.pool_from and d.mode.uses_pool and info.world_size == 1:
        obs.message(f"pool: the saved pool of {d.pool_from} (no start-up)")
    if runtime:
        obs.message(f"teacher {runtime['network']}, student {runtime['student']}, "
                    f"compile {'on' if runtime['compile'] else 'off'}")


def warn_if_not_exact(cfg: Config, restored: bool) -> None:
    """The resume is not exact when the batch source was not in the checkpoint."""
    if not restored:
        what = "state pool" if cfg.distill.mode.uses_pool else "teacher samples"
        _console.warn(f"the checkpoint holds no {what} (save_pool = false or multi-process), so "
                      "they were rebuilt: this resume is not bit-exact")


def write_startup(run_dir: Path, startup: dict[str, Any]) -> None:
    """Record what the pool start-up cost."""
    _fs.write_text(run_dir / "startup.json", json.dumps(startup, indent=1) + "\n")
