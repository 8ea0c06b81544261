"""`dkdm sample`: images from a teacher, a student run directory or an exported student."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dkdm_cli import _console, _fs
from dkdm_cli._device import resolve_device
from dkdm_cli._options import (
    CfgOpt,
    ClassOpt,
    ConfigOpt,
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    SetOpt,
    TeacherOpt,
)
from dkdm_cli.checkpoint import refuse_run_internals
from dkdm_cli.config import SAMPLER_CHOICES, SampleConfig, class_list, load_config
from dkdm_cli.errors import UserError
from dkdm_cli.precision import sampling_policy
from dkdm_cli.sample import (
    compare_with_teacher,
    generate,
    initial_noise,
    recorded_teacher_spec,
    resolve_sampling,
    sample_labels,
    save_comparison,
    save_grid,
    save_npz,
    save_png_folder,
)
from dkdm_cli.teachers.base import Teacher

# The side-by-side comparison shows at most this many pairs (a grid, not a data set).
COMPARE_MAX = 64


def _progress(label: str, total: int, *, disable: bool):
    """A progress bar with images/s; returns (progress, advance(n))."""
    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                        console=_console.err, disable=disable, transient=True)
    task = progress.add_task(label, total=total, rate="")
    start = time.perf_counter()

    def advance(n: int) -> None:
        done = progress.tasks[0].completed + n
        rate = done / max(time.perf_counter() - start, 1e-9)
        progress.update(task, advance=n, rate=f"{rate:.1f} img/s")

    return progress, advance


def load_source(teacher: str | None, model: str | None, *, ema: bool, device: str) -> Teacher:
    """The denoiser to sample: --teacher SPEC or --model (run directory or exported student)."""
    if (teacher is None) == (model is None):
        raise UserError("give exactly one of --teacher NAME or --model PATH")
    from dkdm_cli.teachers.spec import load_denoiser

    return load_denoiser(teacher if teacher is not None else model, ema=ema, device=device,
                         students_only=model is not None)


def check_outputs(*, out: Path | None, files: dict[str, Path | None]) -> None:
    """Refuse unwritable or dangerous output paths before any sampling (exit 2)."""
    if out is not None:
        _fs.check_target(out, flag="--out", folder=True)
        refuse_run_internals(out, flag="--out")
    for flag, path in files.items():
        if path is not None:
            _fs.check_target(path, flag=flag, folder=False)
            refuse_run_internals(path, flag=flag)


def _compare(student: Teacher, path: Path, cfg: SampleConfig, dev, noise, images: np.ndarray,
             *, quiet: bool, labels=None) -> dict:
    """Teacher and student grids from the same noise, side by side in one PNG."""
    from dkdm_cli.api import load_teacher

    spec = recorded_teacher_spec(student)
    if spec is None:
        raise UserError("--compare-teacher needs a student (a run directory or an export) that "
                        "records its teacher; this model records none")
    network = sampling_policy(cfg.precision, dev).network  # the student's policy, for both
    teacher = load_teacher(spec, device=str(dev)).to(dev, dtype=network)
    k = min(cfg.num, COMPARE_MAX)
    # The first k samples are reusable when their batches (hence per-step noise) match a k-run.
    reuse = images[:k] if (k == cfg.num or k % cfg.batch_size == 0) else None
    progress, advance = _progress("teacher", k, disable=quiet)
    with progress:
        teacher_images, student_images = compare_with_teacher(
            student, teacher, noise=noise[:k], steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
            seed=cfg.seed, batch_size=cfg.batch_size, device=dev, student_images=reuse,
            labels=None if labels is None else labels[:k], cfg=cfg.cfg_scale)
        advance(k)
    save_comparison(teacher_images, student_images, path,
                    scale=max(1, 128 // images.shape[1]))
    return {"compare_teacher": str(path), "teacher": spec, "compare_num": k}


def sample(
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Folder for the PNGs.", show_default=False)] = None,
    teacher: TeacherOpt = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A student: run directory (EMA weights) or exported model file.",
        show_default=False)] = None,
    ema: Annotated[bool, typer.Option(
        "--ema/--no-ema", help="Run directories: EMA weights (default) or the raw weights.")] = True,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of images.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps.")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        "--sampler", help=" | ".join(SAMPLER_CHOICES) + " (auto: the model's own).")] = None,
    eta: Annotated[Optional[float], typer.Option("--eta", help="DDIM eta.")] = None,
    seed: SeedOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.")] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write a grid PNG here.")] = None,
    npz: Annotated[Optional[Path], typer.Option(
        "--npz", help="Also write the images as arr_0 (uint8, NHWC) of this .npz, the layout the "
        "ADM/DiT evaluation suites read.", show_default=False)] = None,
    compare_teacher: Annotated[Optional[Path], typer.Option(
        "--compare-teacher", help="Write the recorded teacher's grid and the student's, from "
        "the same noise, side by side to this PNG.", show_default=False)] = None,
    classes: ClassOpt = None,
    cfg_scale: CfgOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from a teacher or a student.

    Example: dkdm sample --model runs/digits-unet-n --num 100 --out samples --npz samples.npz
    Class-conditional: dkdm sample --model runs/digits-cond-unet-n --class 3 --cfg 2.0 --grid g.png
    """
    if out is None and grid is None and npz is None and compare_teacher is None:
        raise UserError("nothing to write: give --out FOLDER, --grid PNG, --npz FILE "
                        "and/or --compare-teacher PNG")
    if npz is not None and npz.suffix != ".npz":
        raise UserError(f"--npz {npz}: the file name must end in .npz")
    check_outputs(out=out, files={"--grid": grid, "--npz": npz, "--compare-teacher": compare_teacher})
    cfg = load_config(config, flags={"sample": dict(num=num, steps=steps, sampler=sampler, eta=eta,
                                                    seed=seed, batch_size=batch_size,
                                                    device=device, classes=classes,
                                                    cfg_scale=cfg_scale, precision=precision)},
                      sets=set_).sample
    dev = resolve_device(cfg.device)
    policy = sampling_policy(cfg.precision, dev)
    denoiser = load_source(teacher, model, ema=ema, device=str(dev)).to(dev, dtype=policy.network)
    labels = sample_labels(denoiser, cfg.num, seed=cfg.seed, classes=class_list(cfg.classes))
    denoiser.denoise_fn(None if labels is None else labels[:1], cfg=cfg.cfg_scale)  # a bad --cfg
    silent = quiet or json_out
    noise = initial_noise(cfg.num, denoiser.sample_shape, seed=cfg.seed)  # (N, C, H, W)
    start = time.perf_counter()
    progress, advance = _progress("sampling", cfg.num, disable=silent)
    with progress:
        images = generate(denoiser, num=cfg.num, steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
                          seed=cfg.seed, batch_size=cfg.batch_size, device=dev, noise=noise,
                          on_batch=advance, labels=labels, cfg=cfg.cfg_scale)
    seconds = time.perf_counter() - start
    if out is not None:
        save_png_folder(images, out)
    if grid is not None:
        save_grid(images, grid, scale=max(1, 128 // images.shape[1]))
    if npz is not None:
        save_npz(images, npz, labels=None if labels is None else labels.numpy())
    result = {"out": str(out) if out else None, "num": int(len(images)),
              "grid": str(grid) if grid else None, "npz": str(npz) if npz else None,
              "source": teacher if teacher is not None else model, "ema": ema,
              **resolve_sampling(denoiser, cfg.sampler, cfg.steps).describe(),
              "eta": cfg.eta, "seed": cfg.seed,
              "seconds": round(seconds, 3), "images_per_second": round(len(images) / seconds, 2)}
    if labels is not None:
        result.update(classes=sorted(set(labels.tolist())), cfg_scale=cfg.cfg_scale,
                      class_counts={int(c): int(n) for c, n in
                                    zip(*labels.unique(return_counts=True), strict=True)})
    if compare_teacher is not None:
        result.update(_compare(denoiser, compare_teacher, cfg, dev, noise, images, quiet=silent,
                               labels=labels))
    if json_out:
        _console.print_json(result)
    elif not quiet:
        where = ", ".join(str(p) for p in (out, npz, grid, compare_teacher) if p is not None)
        _console.out.print(f"wrote {len(images)} images to {where} "
                           f"({result['images_per_second']} img/s)", highlight=False)
