"""Shared Annotated option aliases, so every command spells its common flags the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Project TOML (default: ./dkdm.toml when present).",
                 show_default=False),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override any setting: section.key=value (repeatable).",
                 show_default=False),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N.", show_default=False)
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
TeacherOpt = Annotated[
    Optional[str],
    typer.Option("--teacher", "-t", help="Teacher spec: a name from `dkdm teachers`, "
                 "hf:ORG/NAME[@REV], a path, or py:FILE.py:FUNCTION (your own model; runs that "
                 "code).", show_default=False),
]
StudentOpt = Annotated[
    Optional[str],
    typer.Option("--student", "-s", help="Student preset from `dkdm students`.", show_default=False),
]
ClassOpt = Annotated[
    Optional[list[int]],
    typer.Option("--class", help="Class-conditional models: a class to sample (repeatable; "
                 "default: uniform over all classes).", show_default=False),
]
CfgOpt = Annotated[
    Optional[float],
    typer.Option("--cfg", help="Class-conditional models with a null class: classifier-free "
                 "guidance scale (1: none).", show_default=False),
]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option("--precision", help="Dtype of the sampled networks: auto (bf16 on a CUDA device "
                 "that supports it, else fp32) | fp32 | bf16 | fp16.", show_default=False),
]
