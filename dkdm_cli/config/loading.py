"""Reading a configuration: TOML files, command-line flags and `--set` overrides merged over
the defaults, every value checked against the schema (dkdm_cli/config/schema.py)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


from dkdm_cli.config.schema import _SECTION_TYPES, DEFAULT_CONFIG_NAME, Choice, Config
from dkdm_cli.errors import ConfigError


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table", list: "an array of numbers"}.get(tp, str(tp))


def _check_value(where: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    meta = f.metadata
    if meta.get("auto") and value == "auto":
        return value
    if isinstance(tp, type) and issubclass(tp, Choice):
        if isinstance(value, str) and value in tp._value2member_map_:
            return tp(value)
        if isinstance(value, bool) and hasattr(tp, "from_bool"):
            return tp.from_bool(value)
        raise ConfigError(f"{where}: expected one of {', '.join(m.value for m in tp)}, got {value!r}"
                          + _did_you_mean(str(value), [m.value for m in tp]))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        also = ' or "auto"' if meta.get("auto") else ""
        raise ConfigError(f"{where}: expected {_type_name(tp)}{also}, got {value!r}")
    # TOML accepts nan and inf; every range check below is False for nan, so refuse them here.
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if tp is list:
        return _check_numbers(where, meta, value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(
            f"{where}: expected one of {', '.join(meta['choices'])}, got {value!r}"
            + _did_you_mean(str(value), meta["choices"])
        )
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{where}: expected a value >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        hint = f"; {meta['hint']}" if meta.get("hint") else ""
        raise ConfigError(f"{where}: expected a value <= {meta['max']}, got {value!r}{hint}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{where}: expected a value > {meta['gt']}, got {value!r}")
    return value


def _check_numbers(where: str, meta: dict, value: list) -> list:
    """An array of finite numbers, each within the field's bounds."""
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ConfigError(f"{where}: expected an array of numbers, got {item!r} in it")
        if meta.get("min") is not None and item < meta["min"]:
            raise ConfigError(f"{where}: expected numbers >= {meta['min']}, got {item!r}")
        out.append(item)
    return out


def class_list(values: list, *, where: str = "--class") -> list[int]:
    """A classes setting as integers (UserError for a fractional one)."""
    out = []
    for v in values:
        if float(v) != int(v):
            raise ConfigError(f"{where}: class labels are whole numbers, got {v!r}")
        out.append(int(v))
    return out


def _merge_section(source: str, section: str, current: Any, values: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in fields(cls)}
    updates = {}
    for key, value in values.items():
        if key not in by_name:
            raise ConfigError(
                f"{source}: unknown key [{section}] {key}{_did_you_mean(key, by_name)}"
            )
        tp = hints[key]
        if isinstance(tp, types.UnionType):  # int | str: a number or "auto"
            tp = [a for a in typing.get_args(tp) if a is not str][0]
        updates[key] = _check_value(f"{source}: [{section}] {key}", by_name[key], tp, value)
    return dataclasses.replace(current, **updates)


def merge(config: Config, data: dict[str, Any], *, source: str) -> Config:
    """`config` updated with a nested dict {section: {key: value}} from `source`."""
    out = config
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"{source}: unknown section [{section}]{_did_you_mean(section, _SECTION_TYPES)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {values!r}")
        new = _merge_section(source, section, getattr(out, section), values)
        out = dataclasses.replace(out, **{section: new})
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; malformed TOML is a ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # TOML is UTF-8 by definition
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text: {exc.reason} "
                          f"at byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}") from exc


def parse_set(expr: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as TOML, else a string."""
    if "=" not in expr or "." not in expr.split("=", 1)[0]:
        raise ConfigError(f"--set {expr!r}: expected section.key=value, e.g. distill.lr=2e-4")
    lhs, raw = expr.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(
    path: Path | None = None,
    *,
    flags: dict[str, dict[str, Any]] | None = None,
    sets: list[str] | None = None,
    search_cwd: bool = True,
) -> Config:
    """Resolve the configuration: defaults < the teacher's recommended settings < TOML file <
    flags < --set overrides (dkdm_cli/recommended.py).

    `path` None means ./dkdm.toml when it exists (and `search_cwd`); `flags` holds only the
    command-line flags the user actually gave.
    """
    from dkdm_cli.recommended import recommended_for

    if path is None and search_cwd and Path(DEFAULT_CONFIG_NAME).is_file():
        path = Path(DEFAULT_CONFIG_NAME)
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        layers.append((read_toml(Path(path)), str(path)))
    if flags:
        clean = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in flags.items()}
        layers.append(({s: kv for s, kv in clean.items() if kv}, "command line"))
    for expr in sets or []:
        section, key, value = parse_set(expr)
        layers.append(({section: {key: value}}, f"--set {expr}"))

    def resolve(base: Config) -> Config:
        for values, source in layers:
            base = merge(base, values, source=source)
        return base

    config = resolve(Config())
    # The teacher, the objective and the student's start are known only once every layer is read.
    how = (config.teacher.name, config.distill.objective, bool(config.student.init))
    if recommended_for(*how):
        config = resolve(defaults_for(*how))
    return config


def defaults_for(teacher: str, objective: str = "dkdm", warm_start: bool = False) -> Config:
    """The built-in defaults with the settings recommended for `teacher` (dkdm_cli/recommended.py),
    what a project for that teacher starts from."""
    from dkdm_cli.recommended import recommended_for

    base = Config()
    base = dataclasses.replace(base, teacher=dataclasses.replace(base.teacher, name=teacher))
    return merge(base, recommended_for(teacher, objective, warm_start),
                 source=f"recommended for {teacher}")


def field_docs() -> dict[str, dict[str, tuple[Any, str]]]:
    """{section: {key: (default, doc)}} for templates and documentation."""
    out = {}
    default = Config()
    for section, cls in _SECTION_TYPES.items():
        out[section] = {f.name: (getattr(getattr(default, section), f.name), f.metadata["doc"])
                        for f in fields(cls)}
    return out
