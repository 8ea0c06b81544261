"""Settings recommended for a particular registered teacher.

They sit between the built-in defaults and the user's own settings (defaults < recommended <
dkdm.toml < flags < --set), so `dkdm distill --teacher digits` and a `dkdm init` project agree,
and anything the user writes still wins. The global defaults stay what suits a teacher we know
nothing about (a 2e-3 learning rate would be far too high for a DiT-S student of a hub teacher).

Kept free of torch imports: the configuration is resolved before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

# digits: the CPU demo. Its budget is 10 minutes on a 2-core machine; these values were chosen
# on the trade-off measured in docs/benchmarks.md ("The default run compresses"): a higher
# learning rate for the short run and a 16-step start-up (the 48-step default's pool costs a
# third of the budget).
_DIGITS = {"distill": {"iterations": 1600, "lr": 2e-3, "init_steps": 16}}
RECOMMENDED: dict[str, dict[str, dict[str, Any]]] = {
    "digits": _DIGITS,
    "digits-cond": _DIGITS,  # the same network fine-tuned with labels: the same budget suits it
}


def recommended_for(teacher: str) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} recommended for `teacher` (empty for unregistered specs)."""
    return RECOMMENDED.get(teacher, {})
