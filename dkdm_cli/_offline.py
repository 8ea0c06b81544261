"""One offline switch for everything dkdm might download: hub teachers, direct-link teachers and
the Inception weights.

Offline when either variable is true, in any spelling huggingface_hub accepts (1, true, yes, on;
any case). DKDM_OFFLINE is dkdm's own, so it must also be one of those or false (0, false, no,
off, empty): `DKDM_OFFLINE=maybe` is refused rather than read as online.
  HF_HUB_OFFLINE  huggingface_hub's own switch (TRANSFORMERS_OFFLINE counts when it is unset);
  DKDM_OFFLINE    dkdm's, for users who want dkdm offline but other hub tools online.
Both are read at call time. When HF_HUB_OFFLINE is not in the environment at all, huggingface_hub's
import-time value (constants.HF_HUB_OFFLINE) is respected, so a program that set it before
importing huggingface_hub keeps its choice.
"""

from __future__ import annotations

import os

from dkdm_cli.errors import UserError

ENV_VARS = ("HF_HUB_OFFLINE", "DKDM_OFFLINE")
# huggingface_hub.constants.ENV_VARS_TRUE_VALUES, compared upper-cased as it does.
TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})
FALSE_VALUES = frozenset({"0", "OFF", "NO", "FALSE", ""})


def env_true(value: str | None) -> bool:
    """Whether an environment value means "true" to huggingface_hub."""
    return value is not None and value.strip().upper() in TRUE_VALUES


def _hub_switch() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return env_true(value)
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def dkdm_switch() -> bool:
    """DKDM_OFFLINE as a bool; a UserError naming the spellings for any other value (every
    command checks it first, so a typo never runs online)."""
    value = os.environ.get("DKDM_OFFLINE")
    if value is None or value.strip().upper() in FALSE_VALUES:
        return False
    if env_true(value):
        return True
    raise UserError(f"DKDM_OFFLINE={value!r}: expected 1, true, yes or on (offline), or 0, false, "
                    "no, off or empty (online), in any case")


def offline_reason() -> str | None:
    """Which switch makes dkdm offline (e.g. "HF_HUB_OFFLINE is set"), or None when online;
    a UserError for a DKDM_OFFLINE value that is neither true nor false."""
    if dkdm_switch():
        return "DKDM_OFFLINE is set"
    if _hub_switch():
        return "HF_HUB_OFFLINE is set"
    return None


def is_offline() -> bool:
    """True when downloads are disabled (see the module docstring); never touches the network."""
    return offline_reason() is not None
