"""One rule for "offline", honoured everywhere dkdm could reach the network (hub teachers,
direct-link checkpoints, Inception weights).

Offline when DKDM_OFFLINE or HF_HUB_OFFLINE (or its older alias TRANSFORMERS_OFFLINE, as
huggingface_hub reads it) is set to a true value in any spelling huggingface_hub accepts:
1, on, yes, true, in any case. Read at call time, not import time.
"""

from __future__ import annotations

import os

VARIABLES = ("DKDM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


def is_offline() -> bool:
    """Whether the user asked for no network access."""
    return any(os.environ.get(var, "").strip().upper() in TRUE_VALUES for var in VARIABLES)


def which() -> str:
    """The variable that made it offline (for messages), or ''."""
    for var in VARIABLES:
        if os.environ.get(var, "").strip().upper() in TRUE_VALUES:
            return f"{var}={os.environ[var]}"
    return ""
