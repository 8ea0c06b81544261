"""The CLI skeleton: --version, every command's help has an example, `dkdm init`, and user errors
are one line on stderr without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from dkdm_cli import __version__
from dkdm_cli.cli import app, run
from dkdm_cli.config import DEFAULT_CONFIG_NAME, Config, defaults_for, load_config
from dkdm_cli.errors import ConfigError

COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DKDM_DEBUG", raising=False)


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dkdm {__version__}"


def test_the_foundation_commands_are_registered():
    assert {"init", "students", "teachers", "sample"} <= set(COMMANDS)


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_every_help_has_an_example(name, capsys):
    argv = ["--help"] if name is None else [name, "--help"]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "Usage: dkdm" in out
    assert "Example:" in out
    assert "Example: dkdm " in " ".join(out.split())  # the example is a dkdm command line


def test_no_arguments_shows_help(capsys):
    code = run([])
    captured = capsys.readouterr()
    assert code in (0, 2)  # click's no_args_is_help exits 2 in recent versions
    assert "init" in captured.out + captured.err


def test_init_writes_a_config_that_loads_and_prints_the_next_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "proj"]) == 0
    target = tmp_path / "proj" / DEFAULT_CONFIG_NAME
    assert target.is_file()
    assert load_config(target) == defaults_for("digits")  # the default teacher's settings
    captured = capsys.readouterr()
    assert f"next: cd {Path('proj')} && dkdm distill" in captured.out
    assert str(Path("proj") / DEFAULT_CONFIG_NAME) in captured.err


def test_init_next_command_is_shell_quoted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "my proj"]) == 0
    assert "next: cd 'my proj' && dkdm distill" in capsys.readouterr().out
    assert load_config(tmp_path / "my proj" / DEFAULT_CONFIG_NAME) == defaults_for("digits")


def test_init_in_cwd_with_teacher_and_student(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "--teacher", "hf:google/ddpm-cifar10-32", "--student", "dit-t"]) == 0
    cfg = load_config()  # found as ./dkdm.toml
    assert cfg.teacher.name == "hf:google/ddpm-cifar10-32"
    assert cfg.student.name == "dit-t"
    assert cfg.distill == Config().distill  # nothing recommended for this teacher
    assert "next: dkdm distill" in capsys.readouterr().out


def test_init_refuses_to_overwrite_without_force(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "proj"]) == 0
    target = tmp_path / "proj" / DEFAULT_CONFIG_NAME
    target.write_text('[sample]\nnum = 5\n')
    capsys.readouterr()
    assert run(["init", "proj", "--student", "unet-s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and "--force" in err
    assert len(err.splitlines()) == 1
    assert target.read_text() == '[sample]\nnum = 5\n'  # untouched

    assert run(["init", "proj", "--student", "unet-s", "--force"]) == 0
    cfg = load_config(target)
    assert cfg.student.name == "unet-s"
    assert cfg.sample == Config().sample  # the old file is gone


def test_init_unknown_student_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "proj", "--student", "unet-tt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unet-tt" in err and "Did you mean" in err
    assert not (tmp_path / "proj").exists()


def test_init_teacher_that_would_break_the_toml_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run(["init", "--teacher", 'a"b']) == 2
    assert "quotes" in capsys.readouterr().err
    assert not (tmp_path / DEFAULT_CONFIG_NAME).exists()


def test_init_into_a_file_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    assert run(["init", "afile"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_python_dash_m_version(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DKDM_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "dkdm_cli", "--version"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"dkdm {__version__}"


def test_user_error_is_one_line_without_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path(DEFAULT_CONFIG_NAME).write_text("[sample]\nsteps = -1\n")
    assert run(["sample", "--teacher", "digits", "--out", "out"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_dkdm_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DKDM_DEBUG", "1")
    Path(DEFAULT_CONFIG_NAME).write_text("[sample]\nsteps = -1\n")
    with pytest.raises(ConfigError, match="steps"):
        run(["sample", "--teacher", "digits", "--out", "out"])


def test_usage_error_exit_code_2(capsys):
    assert run(["init", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize("argv,suggestion", [
    (["distil"], "Did you mean 'distill'?"),
    (["distill", "--iteratons", "3"], "--iterations"),
    (["distill", "--batch-size", "2.5"], "integer"),
    (["eval", "x.npz", "--fdi"], "--fid"),
])
def test_usage_errors_keep_clicks_three_lines_exit_2_and_suggest_the_spelling(argv, suggestion,
                                                                             capsys):
    assert run(argv) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: dkdm") and lines[1].startswith("Try 'dkdm")
    assert lines[2].startswith("Error:") and suggestion in lines[2] and len(lines) == 3, lines
