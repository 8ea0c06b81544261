"""`dkdm sample`: images from a teacher, a student model file or a run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dkdm_cli import _console
from dkdm_cli._device import resolve_device
from dkdm_cli._options import ConfigOpt, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, SetOpt, TeacherOpt
from dkdm_cli.config import load_config
from dkdm_cli.errors import UserError
from dkdm_cli.sample import generate, save_grid, save_png_folder
from dkdm_cli.teachers.spec import resolve_teacher


def sample(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNGs.")],
    teacher: TeacherOpt = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A student: run directory or model file.", show_default=False)] = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Number of images.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps.")] = None,
    sampler: Annotated[Optional[str], typer.Option("--sampler", help="iddpm | ddim.")] = None,
    eta: Annotated[Optional[float], typer.Option("--eta", help="DDIM eta.")] = None,
    seed: SeedOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.")] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", help="Also write a grid PNG here.")] = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate images from a teacher or a student.

    Example: dkdm sample --teacher digits --num 100 --out samples --grid grid.png
    """
    if (teacher is None) == (model is None):
        raise UserError("give exactly one of --teacher NAME or --model PATH")
    cfg = load_config(config, flags={"sample": dict(num=num, steps=steps, sampler=sampler, eta=eta,
                                                    seed=seed, batch_size=batch_size,
                                                    device=device)}, sets=set_).sample
    dev = resolve_device(cfg.device)
    source = teacher if teacher is not None else model
    if model is not None and not Path(model).exists():
        raise UserError(f"--model {model}: no such file or folder")
    denoiser = resolve_teacher(source, device=str(dev))
    start = time.perf_counter()
    with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  console=_console.err, disable=quiet or json_out, transient=True) as progress:
        task = progress.add_task("sample", total=cfg.num, rate="")

        def advance(n: int) -> None:
            done = progress.tasks[0].completed + n
            rate = done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=n, rate=f"{rate:.1f} img/s")

        images = generate(denoiser, num=cfg.num, steps=cfg.steps, sampler=cfg.sampler, eta=cfg.eta,
                          seed=cfg.seed, batch_size=cfg.batch_size, device=dev, on_batch=advance)
    seconds = time.perf_counter() - start
    save_png_folder(images, out)
    if grid is not None:
        save_grid(images, grid, scale=max(1, 128 // images.shape[1]))
    result = {"out": str(out), "num": int(len(images)), "grid": str(grid) if grid else None,
              "source": source, "steps": cfg.steps, "sampler": cfg.sampler, "seed": cfg.seed,
              "seconds": round(seconds, 3), "images_per_second": round(len(images) / seconds, 2)}
    if json_out:
        _console.print_json(result)
    elif not quiet:
        _console.out.print(f"wrote {len(images)} images to {out} "
                           f"({result['images_per_second']} img/s)", highlight=False)
