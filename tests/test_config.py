"""dkdm.toml: every bad input is exit code 2 with a message naming the file, the key and what was
expected; precedence is defaults < dkdm.toml < flags < --set; the resolved config and the
template stay in sync with the dataclasses."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from dkdm_cli.cli import run
from dkdm_cli.commands import sample as sample_cmd
from dkdm_cli.commands.init import render, template_text
from dkdm_cli.config import Compile, Config, defaults_for, field_docs, load_config, merge
from dkdm_cli.config import schema as config_mod
from dkdm_cli.errors import ConfigError, UserError
from dkdm_cli.recommended import recommended_for


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DKDM_DEBUG", raising=False)


def _sample_argv(*extra: str) -> list[str]:
    return ["sample", "--teacher", "digits", "--out", "out", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# -- bad configuration files ---------------------------------------------------------------------

BAD_FILES = {
    "unknown-key": ("[distill]\nbatch_sise = 8\n",
                    ["[distill] batch_sise", "unknown key", "did you mean 'batch_size'"]),
    "unknown-section": ("[distil]\nbatch_size = 8\n",
                        ["unknown section [distil]", "did you mean 'distill'"]),
    "string-for-int": ('[distill]\nbatch_size = "8"\n',
                       ["[distill] batch_size", "expected an integer", "'8'"]),
    "float-for-int": ("[sample]\nnum = 3.0\n", ["[sample] num", "expected an integer", "3.0"]),
    "bool-for-int": ("[sample]\nnum = true\n", ["[sample] num", "expected an integer", "True"]),
    "int-for-bool": ("[distill]\nema_warmup = 1\n", ["[distill] ema_warmup", "expected true or false", "1"]),
    "int-for-string": ("[teacher]\nname = 3\n", ["[teacher] name", "expected a string"]),
    "int-for-table": ("[student]\nkwargs = 3\n", ["[student] kwargs", "expected a table"]),
    "string-for-float": ('[distill]\nlr = "fast"\n', ["[distill] lr", "expected a number"]),
    "zero-batch": ("[distill]\nbatch_size = 0\n",
                   ["[distill] batch_size", "expected a value >= 1", "got 0"]),
    "above-max": ("[distill]\nema_rate = 1.5\n", ["[distill] ema_rate", "expected a value <= 1"]),
    "not-positive": ("[distill]\nrho = 0.0\n", ["[distill] rho", "expected a value > 0"]),
    "nan": ("[distill]\nlr = nan\n", ["[distill] lr", "expected a finite number", "nan"]),
    "inf": ("[distill]\ngrad_clip = inf\n", ["[distill] grad_clip", "expected a finite number"]),
    "bad-choice": ('[sample]\nsampler = "ddpm"\n',
                   ["[sample] sampler", "expected one of auto, iddpm, ddim", "'ddpm'",
                    "did you mean 'iddpm'"]),
    "bad-mode": ('[distill]\nmode = "dynamik"\n',
                 ["[distill] mode", "basic, shuffle, dynamic, synthetic", "did you mean 'dynamic'"]),
    "section-not-table": ("sample = 3\n", ["[sample] must be a table"]),
    "malformed": ("[distill]\nbatch_size = 8\nlr = = 2\n", ["malformed TOML", "line 3"]),
    "unclosed-table": ("[sample\nnum = 3\n", ["malformed TOML", "line 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_is_exit_2_naming_file_key_and_expectation(case, capsys):
    text, expected = BAD_FILES[case]
    Path("bad.toml").write_text(text)
    assert run(_sample_argv("--config", "bad.toml")) == 2
    line = _error_line(capsys)
    assert line.startswith("error: bad.toml: ")
    for fragment in expected:
        assert fragment in line, (fragment, line)


def test_bad_dkdm_toml_in_cwd_is_found_and_named(capsys):
    Path("dkdm.toml").write_text("[sample]\nnum = 0\n")
    assert run(_sample_argv()) == 2
    assert _error_line(capsys).startswith("error: dkdm.toml: [sample] num: expected a value >= 1")


def test_config_that_is_not_text_or_not_a_file(capsys):
    Path("binary.toml").write_bytes(b"\xff\xfe[sample]\n")
    assert run(_sample_argv("--config", "binary.toml")) == 2
    assert _error_line(capsys).startswith("error: binary.toml: not a TOML file (not UTF-8 text")
    Path("folder.toml").mkdir()
    assert run(_sample_argv("--config", "folder.toml")) == 2
    assert _error_line(capsys).startswith("error: folder.toml: cannot read config")


def test_missing_config_file(capsys):
    assert run(_sample_argv("--config", "nowhere/missing.toml")) == 2
    line = _error_line(capsys)
    assert str(Path("nowhere/missing.toml")) in line and "not found" in line


@pytest.mark.parametrize(("expr", "expected"), [
    ("sample.num", ["--set 'sample.num'", "expected section.key=value"]),
    ("num=3", ["--set 'num=3'", "expected section.key=value"]),
    ("sample.nmu=3", ["--set sample.nmu=3", "unknown key [sample] nmu", "did you mean 'num'"]),
    ("sampel.num=3", ["unknown section [sampel]", "did you mean 'sample'"]),
    ("sample.num=abc", ["[sample] num", "expected an integer", "'abc'"]),
    ("sample.sampler=ddpm", ["[sample] sampler", "expected one of auto, iddpm, ddim"]),
])
def test_bad_set_is_exit_2(expr, expected, capsys):
    assert run(_sample_argv("--set", expr)) == 2
    line = _error_line(capsys)
    for fragment in expected:
        assert fragment in line, (fragment, line)


def test_bad_flag_value_is_exit_2(capsys):
    assert run(_sample_argv("--num", "0")) == 2
    assert "command line: [sample] num: expected a value >= 1" in _error_line(capsys)


def test_load_config_raises_config_error_not_other_exceptions():
    Path("dkdm.toml").write_text("[distill]\nbatch_sise = 8\n")
    with pytest.raises(ConfigError, match=r"dkdm.toml: unknown key \[distill\] batch_sise"):
        load_config()
    assert load_config(search_cwd=False) == defaults_for("digits")  # not searched: defaults


# -- precedence ------------------------------------------------------------------------------------


class _Resolved(UserError):
    """Raised by the spy below once the command has resolved its configuration."""


@pytest.fixture
def resolve(monkeypatch, capsys):
    """resolve(*flags) -> the [sample] section `dkdm sample` resolved, as a dict. A spy replaces
    the command's load_config: it records the result and stops the command (exit 2) before a
    teacher is loaded, so only the config plumbing of the real command is exercised."""
    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(dataclasses.asdict(load_config(*args, **kwargs).sample))
        raise _Resolved("resolved")

    monkeypatch.setattr(sample_cmd, "load_config", spy)

    def _resolve(*extra: str) -> dict:
        seen.clear()
        assert run(_sample_argv(*extra)) == 2
        assert _error_line(capsys) == "error: resolved"
        return dict(seen)

    return _resolve


def test_precedence_through_the_sample_command(resolve):
    got = resolve()
    assert (got["num"], got["steps"], got["seed"]) == (64, "auto", 0)  # defaults (auto: 50 or a
    # few-step student's own)
    Path("dkdm.toml").write_text(
        '[sample]\nnum = 5\nsteps = 7\nsampler = "ddim"\nseed = 3\ndevice = "cpu"\n')
    got = resolve()
    assert (got["num"], got["steps"], got["sampler"], got["seed"], got["device"]) == (5, 7, "ddim", 3, "cpu")
    got = resolve("--num", "6", "--steps", "8", "--sampler", "iddpm")
    assert (got["num"], got["steps"], got["sampler"], got["seed"]) == (6, 8, "iddpm", 3)
    assert got["eta"] == 0.0  # untouched everywhere: the default
    got = resolve("--num", "6", "--steps", "8", "--set", "sample.num=9", "--set", "sample.eta=0.5",
                  "--set", "sample.num=10")  # the last --set wins
    assert (got["num"], got["steps"], got["eta"], got["seed"]) == (10, 8, 0.5, 3)


def test_explicit_config_replaces_the_cwd_one(resolve):
    Path("dkdm.toml").write_text("[sample]\nnum = 5\nseed = 3\n")
    Path("other.toml").write_text("[sample]\nnum = 11\n")
    got = resolve("--config", "other.toml")
    assert (got["num"], got["seed"]) == (11, 0)


def test_precedence_with_load_config():
    Path("project.toml").write_text(
        "[distill]\nlr = 2e-4\nbatch_size = 32\nmode = \"basic\"\n[student]\nkwargs = {depth = 2}\n")
    cfg = load_config(
        Path("project.toml"),
        flags={"distill": {"batch_size": 16, "lr": None, "seed": 7}},  # None: flag not given
        sets=["distill.seed=8", "student.name=dit-t"],
    )
    assert cfg.distill.lr == 2e-4  # file over default (a None flag does not erase it)
    assert cfg.distill.mode == "basic"
    assert cfg.distill.batch_size == 16  # flag over file
    assert cfg.distill.seed == 8  # --set over flag
    assert cfg.student == dataclasses.replace(Config().student, name="dit-t", kwargs={"depth": 2})
    assert cfg.distill.rho == Config().distill.rho  # untouched: default
    assert cfg.sample == Config().sample


def test_int_is_accepted_for_float():
    cfg = merge(Config(), {"distill": {"lr": 1}}, source="x")
    assert cfg.distill.lr == 1.0 and isinstance(cfg.distill.lr, float)


# -- round trip and template -----------------------------------------------------------------------


def _non_default() -> Config:
    base = Config()
    return dataclasses.replace(
        base,
        teacher=dataclasses.replace(base.teacher, name="hf:google/ddpm-cifar10-32",
                                    arch_kwargs={"num_channels": 128, "learn_sigma": True}),
        student=dataclasses.replace(base.student, name="dit-s/2", kwargs={"depth": 4, "mlp_ratio": 2.5}),
        distill=dataclasses.replace(base.distill, lr=9.6e-5, rho=4.0, mode="shuffle", compile=Compile.ON,
                                    run_dir="runs/x y"),
        sample=dataclasses.replace(base.sample, sampler="ddim", eta=0.3, steps=200),
        export=dataclasses.replace(base.export, format="onnx", ema=False),
    )


@pytest.mark.parametrize("cfg", [Config(), _non_default()], ids=["defaults", "changed"])
def test_resolved_config_round_trips_through_toml(cfg):
    again = merge(Config(), tomllib.loads(cfg.to_toml()), source="round trip")
    assert again == cfg
    cfg.save(Path("sub/resolved.toml"))
    assert load_config(Path("sub/resolved.toml")) == cfg


def _toml_value(value) -> str:
    if isinstance(value, dict):
        assert not value, "dict defaults are expected to be empty"
        return "{}"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def test_template_lists_every_key_with_its_default_and_doc():
    docs = field_docs()
    teacher = "hf:org/model"  # a teacher with no recommended settings
    defaults = dataclasses.replace(Config(), teacher=dataclasses.replace(Config().teacher, name=teacher))
    text = render(teacher=teacher, student=defaults.student.name)
    parsed = tomllib.loads(text)
    assert list(parsed) == list(docs)  # every section, in order, nothing else
    assert merge(Config(), parsed, source="template") == defaults
    lines = text.splitlines()
    for section, keys in docs.items():
        assert list(parsed[section]) == list(keys), section  # every key, in order
        start = lines.index(f"[{section}]")
        for key, (default, doc) in keys.items():
            value = _toml_value(default)
            where = next(i for i in range(start, len(lines)) if lines[i].startswith(f"{key} = "))
            assert lines[where] == f"{key} = {_toml_value(getattr(getattr(defaults, section), key))}"
            assert lines[where - 1] == f"# {doc} (default: {value})", (section, key)


def test_template_has_only_the_teacher_and_student_placeholders():
    raw = template_text()
    assert 'name = "$teacher"' in raw and 'name = "$student"' in raw
    assert raw.count("$") == 2
    parsed = tomllib.loads(render(teacher="hf:org/x@main", student="dit-t"))
    assert (parsed["teacher"]["name"], parsed["student"]["name"]) == ("hf:org/x@main", "dit-t")


def test_field_docs_cover_every_dataclass_field():
    for section, cls in config_mod._SECTION_TYPES.items():
        names = [f.name for f in dataclasses.fields(cls)]
        assert list(field_docs()[section]) == names
        assert all(doc for _, doc in field_docs()[section].values())


# -- settings recommended for a teacher ----------------------------------------------------------


def test_recommended_settings_sit_between_defaults_and_the_users_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recommended = recommended_for("digits")["distill"]
    assert recommended and all(getattr(Config().distill, k) != v for k, v in recommended.items())
    digits = load_config(search_cwd=False)  # the default teacher is digits
    assert {k: getattr(digits.distill, k) for k in recommended} == recommended
    other = load_config(flags={"teacher": {"name": "hf:org/model"}}, search_cwd=False)
    assert other.distill == Config().distill  # nothing leaks to another teacher
    Path("dkdm.toml").write_text("[distill]\nlr = 1e-4\n")
    mine = load_config()
    assert mine.distill.lr == 1e-4  # the user's file wins
    assert mine.distill.iterations == recommended["iterations"]  # the rest still applies
    assert load_config(sets=["distill.iterations=7"]).distill.iterations == 7


def test_template_for_a_teacher_carries_its_recommended_values_marked():
    text = render(teacher="digits", student="unet-n")
    assert merge(Config(), tomllib.loads(text), source="template") == defaults_for("digits")
    for key, value in recommended_for("digits")["distill"].items():
        line = next(x for x in text.splitlines() if x.startswith(f"{key} = "))
        assert line == f"{key} = {_toml_value(value)}  # recommended for the digits teacher"
