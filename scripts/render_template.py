"""Regenerate templates/dkdm.toml from the config dataclasses (their defaults and docs), so the
template `dkdm init` writes never drifts from the code. tests/test_config.py checks it is in sync.

    python scripts/render_template.py
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from dkdm_cli.config import field_docs

HEADER = [
    "# dkdm project configuration, written by `dkdm init`.",
    "# Precedence: built-in defaults < this file < command-line flags < --set section.key=value.",
    "# Every key below is shown with its default; delete a line to fall back to the default.",
    "",
]
PLACEHOLDERS = {("teacher", "name"): '"$teacher"', ("student", "name"): '"$student"'}


def toml_value(value) -> str:
    """A value as it is written on the right of `key = ` in TOML."""
    if isinstance(value, dict) and not value:
        return "{}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def render() -> str:
    """The template text."""
    lines = list(HEADER)
    for section, keys in field_docs().items():
        lines.append(f"[{section}]")
        for key, (default, doc) in keys.items():
            lines.append(f"# {doc} (default: {toml_value(default)})")
            lines.append(f"{key} = {PLACEHOLDERS.get((section, key), toml_value(default))}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "templates" / "dkdm.toml"
    path.write_text(render())
    print(f"wrote {path}")
