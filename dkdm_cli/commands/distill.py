"""`dkdm distill`: train a student on the teacher's own denoising chain."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from dkdm_cli import _console
from dkdm_cli._options import ConfigOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, SetOpt, StudentOpt, TeacherOpt
from dkdm_cli.config import Mode, Objective, load_config


def distill(
    teacher: TeacherOpt = None,
    student: StudentOpt = None,
    teacher_arch: Annotated[Optional[str], typer.Option(
        "--teacher-arch", help="Architecture preset of an improved/guided-diffusion .pt teacher, "
        "e.g. iddpm-cifar10.", show_default=False)] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", "-n",
                          help="Total iterations (a resumed run stops exactly here).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", help="States per iteration.")] = None,
    mode: Annotated[Optional[str], typer.Option(
        "--mode", help=f"{Mode.spelled()} (see docs/method.md).")] = None,
    objective: Annotated[Optional[str], typer.Option(
        "--objective", help=f"{Objective.spelled()}: consistency makes a few-step student "
        "(1-8 sampling steps; see docs/fewstep.md).")] = None,
    student_init: Annotated[Optional[Path], typer.Option(
        "--student-init", help="Start the student from a run directory or exported model of "
        "the same preset (e.g. a DKDM student, for the few-step stage).",
        show_default=False)] = None,
    few_step: Annotated[Optional[Path], typer.Option(
        "--few-step", help="Make a few-step student of a DKDM run: its teacher and student, "
        "--objective consistency, --student-init RUN, the few-step settings recommended for the "
        "teacher, --run-dir RUN-fast (your own flags and --set still win).",
        show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", "-r", help="Run directory.")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile",
                        help="torch.compile the student.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Start over a run directory made with "
                     "another configuration: the old run is moved aside to RUN_DIR.bak-N, never "
                     "deleted.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Distill the teacher into the student with DKDM (no training data). Resumes a run directory.

    Example: dkdm distill --teacher digits --student unet-t --iterations 2000 --run-dir runs/demo
    """
    from dkdm_cli.distill.engine import distill as run_distill

    flags = {
        "teacher": {"name": teacher, "arch": teacher_arch},
        "student": {"name": student, "init": str(student_init) if student_init else None},
        "distill": {"iterations": iterations, "batch_size": batch_size, "mode": mode, "lr": lr,
                    "objective": objective,
                    "run_dir": str(run_dir) if run_dir is not None else None, "device": device,
                    "seed": seed, "compile": compile_},
    }
    if few_step is not None:
        from dkdm_cli.distill.warmstart import few_step_flags

        flags = _overlay(few_step_flags(few_step), flags)
    cfg = load_config(config, flags=flags, sets=set_)
    result = run_distill(cfg, force=force, quiet=quiet, json_out=json_out)
    summary = {"event": "end", "status": result.status, "run_dir": str(result.run_dir),
               "step": result.step, "seconds": round(result.seconds, 2),
               "checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "signal": result.signal or None, "teacher_forwards": result.teacher_forwards,
               "during_startup": result.during_startup}
    if result.is_main and json_out:
        _console.print_json(summary)
    elif result.is_main and not quiet:
        last = result.last_metrics
        loss = f", loss {last['loss']:.4g}" if last.get("loss") is not None else ""
        _console.out.print(f"{result.status}: {result.run_dir} at iteration {result.step}{loss}",
                           highlight=False)
        if result.status == "interrupted" and result.during_startup:
            kept = f"kept {result.checkpoint}" if result.checkpoint else "no checkpoint yet"
            _console.info(f"stopped by {result.signal or 'a signal'} during the start-up: nothing "
                          f"new to save ({kept}). Run the same command again: the start-up "
                          "restarts from the beginning (the same seed gives the same states)")
        elif result.status == "interrupted":
            _console.info(f"stopped by {result.signal or 'a signal'}; saved {result.checkpoint}. "
                          "Run the same command again to resume")
        else:
            guidance = result.null_class is not None and result.guidance_scale == 1.0
            _console.out.print(next_steps(result.run_dir, num_classes=result.num_classes,
                                          guidance=guidance, few_step=cfg.distill.objective
                                          is Objective.CONSISTENCY),
                               highlight=False)
    if result.status == "interrupted":
        raise typer.Exit(result.exit_code or 130)


def _overlay(base: dict[str, dict], mine: dict[str, dict]) -> dict[str, dict]:
    """`base` flags with the user's given flags (not None) on top."""
    out = {section: dict(values) for section, values in base.items()}
    for section, values in mine.items():
        out.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return out


def next_steps(run_dir: Path, *, num_classes: int = 0, guidance: bool = False,
               few_step: bool = False) -> str:
    """What was made and the commands to run next, with the run directory filled in (and, for a
    class-conditional student, how to pick a class and a guidance scale; for a DKDM student,
    how to make a few-step one of it)."""
    rd = shlex.quote(str(run_dir))
    steps = " --steps 4" if few_step else ""
    kind = "a few-step student: 1-8 steps, 4 by default" if few_step else "student"
    text = (f"made: {run_dir}/checkpoints ({kind}, EMA weights), metrics.jsonl, grids/\n"
            "next:\n"
            f"  dkdm sample --model {rd}{steps} --num 64 --grid samples.png "
            "--compare-teacher vs-teacher.png\n")
    if num_classes:
        cfg = " --cfg 2.0" if guidance else ""
        c = min(3, num_classes - 1)
        text += (f"  dkdm sample --model {rd} --class {c}{cfg} --num 16 --grid class{c}.png"
                 f"   # classes 0..{num_classes - 1}\n")
    text += f"  dkdm eval {rd} --fid --num 1000        # FID against the teacher's own samples\n"
    if num_classes == 10:
        text += f"  dkdm eval {rd} --consistency --num 1000   # digits: right class per sample\n"
    if not few_step:
        text += f"  dkdm distill --few-step {rd}   # a 4-step student of it, in {run_dir}-fast\n"
    export = "" if num_classes else "   # or student.onnx, or a diffusers folder"
    return text + f"  dkdm export --run-dir {rd} --out student.safetensors{export}"
