"""The `dkdm` command line. Each command parses, calls the library, prints; errors are turned
into one-line messages and exit codes in one place (`run`)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape

from dkdm_cli import __version__, _console, _offline
from dkdm_cli.commands.catalog import students, teachers
from dkdm_cli.commands.distill import distill
from dkdm_cli.commands.evaluate import evaluate
from dkdm_cli.commands.export import export
from dkdm_cli.commands.init import init
from dkdm_cli.commands.sample import sample
from dkdm_cli.errors import DkdmError, Interrupted, from_os_error

app = typer.Typer(
    name="dkdm",
    help="Distill a pretrained diffusion model into any architecture, without its data (DKDM).\n\n"
    "Example: dkdm init && dkdm distill && dkdm sample --model runs/digits-unet-n --out samples",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        _console.out.print(f"dkdm {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """Distill a pretrained diffusion model into any architecture, without its data (DKDM)."""
    _offline.dkdm_switch()  # DKDM_OFFLINE=maybe is refused before any command runs


app.command("init")(init)
app.command("students")(students)
app.command("teachers")(teachers)
app.command("distill")(distill)
app.command("sample")(sample)
app.command("eval")(evaluate)
app.command("export")(export)


def _click_errors() -> tuple[type[Exception], ...]:
    # Recent typer vendors click as typer._click (and no longer depends on click); older typer
    # raises click's own exceptions. Catch whichever exist, so usage errors never leak out.
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_CLICK_ERRORS = _click_errors()


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` and return the exit code (never raises for user errors)."""
    command = typer.main.get_command(app)
    debug = os.environ.get("DKDM_DEBUG") == "1"
    try:
        result = command.main(args=argv, prog_name="dkdm", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:  # on older typer this is click's Exit, re-exported
        return exc.exit_code
    except _CLICK_ERRORS as exc:
        exc.show(file=sys.stderr)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _console.err.print("interrupted")
        return 130
    except Interrupted as exc:
        _console.err.print("aborted by a second stop signal (the last checkpoint is intact)")
        return exc.exit_code
    except (DkdmError, OSError) as exc:
        if debug:
            raise
        if isinstance(exc, OSError):  # a file-system failure anywhere below: one line, no trace
            exc = from_os_error(exc)
        _console.err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return exc.exit_code


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
