"""`dkdm eval`: FID, sFID, IS, KID and precision/recall of samples or of a student."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dkdm_cli import _console
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
from dkdm_cli.config import SAMPLER_CHOICES, load_config
from dkdm_cli.errors import ThresholdError
from dkdm_cli.evaluate import EvalResult
from dkdm_cli.evaluate import evaluate as run_evaluation
from dkdm_cli.evaluate.metrics import VALUES, parse_bound

_LABELS = {"fid": "FID", "sfid": "sFID", "isc": "IS", "isc_std": "IS std", "kid": "KID",
           "kid_std": "KID std", "precision": "precision", "recall": "recall",
           "f_score": "F-score", "consistency": "class consistency"}


def _table(result: EvalResult) -> Table:
    samples, ref = result.samples, result.reference
    title = f"{samples['source']} ({samples['num']} images) vs {ref.get('kind')}"
    if ref.get("kind") == "none":
        title = f"{samples['source']} ({samples['num']} images), no reference needed"
    elif ref.get("kind") == "teacher":
        title += f" {ref['teacher']} ({ref['num']} samples, {ref['sampler']} {ref['steps']} steps)"
    elif ref.get("source"):
        title += f" {ref['source']}"
    table = Table(title=title)
    for col in ("metric", "value", "better", "bound"):
        table.add_column(col, justify="right" if col in ("value", "bound") else "left")
    limits = {b.metric: b for b in result.bounds}
    for name, value in result.values.items():
        bound = limits.get(name)
        mark = "" if bound is None else (f"[red]> {bound.limit:g}[/red]" if bound.crossed(result.values)
                                         else f"<= {bound.limit:g}")
        table.add_row(_LABELS.get(name, name), f"{value:.6g}", VALUES[name][1], mark)
    return table


def evaluate(
    samples: Annotated[str, typer.Argument(
        help="What to score: a folder of images, an .npz (arr_0), a run directory or exported "
        "student (sampled on the fly), or a teacher spec.", show_default=False)],
    fid: Annotated[bool, typer.Option("--fid", help="Frechet Inception Distance.")] = False,
    isc: Annotated[bool, typer.Option("--isc", help="Inception Score (needs no reference).")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="Kernel Inception Distance.")] = False,
    prc: Annotated[bool, typer.Option("--prc", help="Precision / recall (k=3, pool_3).")] = False,
    sfid: Annotated[bool, typer.Option("--sfid", help="Spatial FID (ADM's mixed_6/conv).")] = False,
    consistency: Annotated[bool, typer.Option(
        "--consistency", help="Class-conditional digits models: the fraction of samples of each "
        "class the digits classifier labels as that class (no Inception needed).")] = False,
    classes: ClassOpt = None,
    cfg_scale: CfgOpt = None,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", "-r", help="teacher (its samples: the data-free score), a folder of "
        "images, or an .npz with arr_0 and/or mu, sigma (and mu_s, sigma_s for sFID).",
        show_default=False)] = None,
    teacher: TeacherOpt = None,
    num: Annotated[Optional[int], typer.Option("--num", "-n", help="Samples to generate.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps.")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        "--sampler", help=" | ".join(SAMPLER_CHOICES) + " (auto: the model's own).")] = None,
    seed: SeedOpt = None,
    reference_seed: Annotated[Optional[int], typer.Option(
        "--reference-seed", help="Seed of the teacher reference (default: seed + 1000003).",
        show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per batch.")] = None,
    ema: Annotated[bool, typer.Option(
        "--ema/--no-ema", help="Run directories: EMA weights (default) or the raw weights.")] = True,
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception-weights", help="torch-fidelity Inception weights file, for offline use "
        "(or set DKDM_INCEPTION_WEIGHTS).", show_default=False)] = None,
    allow_unknown_inception: Annotated[bool, typer.Option(
        "--allow-unknown-inception", help="Score with Inception weights whose sha256 is not "
        "torch-fidelity's (the scores then compare with no published ones).")] = False,
    fail_above: Annotated[Optional[list[str]], typer.Option(
        "--fail-above", help="METRIC=VALUE: exit 1 when METRIC is above VALUE (repeatable).",
        show_default=False)] = None,
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse cached features and teacher references.")] = True,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score samples, or a student sampled on the fly, against the teacher or real images.

    Example: dkdm eval runs/digits-unet-n --fid --isc --num 1000 --fail-above fid=30
    Per class: dkdm eval runs/digits-cond-unet-n --consistency --fid --class 3
    """
    bounds = [parse_bound(text) for text in fail_above or []]  # malformed: exit 2, before work
    cfg = load_config(config, flags={"eval": dict(
        num=num, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size,
        reference=reference, device=device, classes=classes, cfg_scale=cfg_scale,
        precision=precision,
        inception_weights=str(inception_weights) if inception_weights else None,
        allow_unknown_inception=allow_unknown_inception or None)}, sets=set_).eval
    flags = [name for name, on in (("fid", fid), ("isc", isc), ("kid", kid), ("prc", prc),
                                   ("sfid", sfid), ("consistency", consistency)) if on]
    silent = quiet or json_out
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=_console.err, disable=silent,
                  transient=True) as bar:

        def progress(label: str, total: int):
            task = bar.add_task(label, total=total)
            return lambda n: bar.update(task, advance=n)

        result = run_evaluation(samples, cfg=cfg, metrics=flags, bounds=bounds, teacher=teacher,
                                ema=ema, reference_seed=reference_seed, use_cache=cache,
                                progress=progress, quiet=silent)
    if json_out:
        _console.print_json(result.to_dict())
    elif not quiet:
        _console.out.print(_table(result))
    crossed = result.crossed
    if crossed:
        raise ThresholdError("bound crossed: " + "; ".join(
            f"{b.metric} = {result.values[b.metric]:.6g} > {b.limit:g}" for b in crossed))
