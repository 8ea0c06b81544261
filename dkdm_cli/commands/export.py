"""`dkdm export`: a run's student as a model file (safetensors), ONNX or a diffusers pipeline
folder, with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dkdm_cli import _console
from dkdm_cli._options import ConfigOpt, JsonOpt, QuietOpt, SetOpt
from dkdm_cli.config import load_config
from dkdm_cli.errors import UserError
from dkdm_cli.export import FOLDER_FORMATS, FORMATS, export_student


def export(
    run_dir: Annotated[Path, typer.Option(
        "--run-dir", help="The run directory to export from (its newest checkpoint).",
        show_default=False)],
    fmt: Annotated[Optional[str], typer.Option(
        "--format", "-f", help="safetensors (a dkdm model file) | onnx (the denoiser) | "
        "diffusers (a folder for DiffusionPipeline.from_pretrained).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Output file, or folder for diffusers (default: "
        "RUN_DIR/export/<run>.<format>, or <run>-diffusers/).", show_default=False)] = None,
    ema: Annotated[Optional[bool], typer.Option(
        "--ema/--no-ema", help="Export the EMA weights (default) or the raw ones.",
        show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export a distilled student, ready to share, sample or serve.

    Example: dkdm export --run-dir runs/digits-unet-n --format onnx --out student.onnx
    Diffusers: dkdm export --run-dir runs/digits-unet-n --format diffusers --out digits-student
    """
    if fmt is None and out is not None and out.suffix.lstrip(".") in FORMATS:
        fmt = out.suffix.lstrip(".")  # --out student.onnx says which format
    cfg = load_config(config, flags={"export": dict(format=fmt, ema=ema)}, sets=set_).export
    if out is not None and cfg.format not in FOLDER_FORMATS and out.suffix != f".{cfg.format}":
        raise UserError(f"--out {out}: a {cfg.format} export must end in .{cfg.format}")
    result = export_student(run_dir, fmt=cfg.format, out=out, ema=cfg.ema)
    if json_out:
        _console.print_json(result.to_dict())
    elif not quiet:
        check = (f", max abs diff to PyTorch {result.max_abs_diff:.1e}"
                 if result.max_abs_diff is not None else "")
        _console.out.print(
            f"exported step {result.step} ({'EMA' if result.ema else 'raw'} weights, "
            f"{result.parameters:,} params) to {result.path}{check}; model card {result.card}",
            highlight=False)
