"""`dkdm init`: write a commented dkdm.toml to start a project."""

from __future__ import annotations

import shlex
import string
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import tomli_w
import typer

from dkdm_cli import _console, _fs
from dkdm_cli.config import DEFAULT_CONFIG_NAME, Config
from dkdm_cli.errors import UserError
from dkdm_cli.recommended import recommended_for


class AlreadyExists(UserError):
    """The config exists and --force was not given (exit 2: the user can fix it)."""


def template_text() -> str:
    """The dkdm.toml template shipped in the wheel (or the source tree's templates/)."""
    packaged = resources.files("dkdm_cli") / "templates" / "dkdm.toml"
    if packaged.is_file():
        return packaged.read_text()
    return (Path(__file__).resolve().parents[2] / "templates" / "dkdm.toml").read_text()


def render(*, teacher: str, student: str) -> str:
    """The template with the teacher and student filled in, and the values recommended for that
    teacher (dkdm_cli/recommended.py) in place of the defaults, each marked as such."""
    lines = string.Template(template_text()).substitute(teacher=teacher, student=student).splitlines()
    recommended, section = recommended_for(teacher), ""
    for i, line in enumerate(lines):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key = line.split(" = ", 1)[0]
        values = recommended.get(section, {})
        if " = " in line and not line.startswith("#") and key in values:
            value = tomli_w.dumps({"v": values[key]}).strip().removeprefix("v = ")
            lines[i] = f"{key} = {value}  # recommended for the {teacher} teacher"
    return "\n".join(lines) + "\n"


def init(
    directory: Annotated[Path, typer.Argument(help="Project folder (created if missing).")] = Path("."),
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Teacher spec.")] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Student preset.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing dkdm.toml.")] = False,
) -> None:
    """Write DIR/dkdm.toml with every setting commented, then print the next command.

    Example: dkdm init my-project --teacher digits --student dit-t
    """
    defaults = Config()
    teacher = teacher or defaults.teacher.name
    student = student or defaults.student.name
    from dkdm_cli.models import MODELS  # imported here: torch and timm are slow to import

    if student not in MODELS:
        MODELS.resolve(student)  # raises the registry's "did you mean" error
    if '"' in teacher or "\\" in teacher:
        raise UserError(f"--teacher {teacher!r}: quotes and backslashes are not allowed")
    target = directory / DEFAULT_CONFIG_NAME
    if target.exists() and not force:
        raise AlreadyExists(f"{target} already exists; pass --force to overwrite it")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    _fs.write_text(target, render(teacher=teacher, student=student))
    where = "" if directory == Path(".") else f"cd {shlex.quote(str(directory))} && "
    _console.info(f"wrote {target}")
    _console.out.print(f"next: {where}dkdm distill", highlight=False)
