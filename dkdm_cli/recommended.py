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
# The few-step stage (`objective = "consistency"` from a DKDM student: `student.init`), chosen
# by measurement (docs/fewstep.md): a lower learning rate than DKDM's from-scratch one, no
# warm-up (the student is already trained), and a faster EMA for the sampled weights. A
# consistency run from random weights gets the from-scratch settings above (measured better).
_DIGITS_FEW_STEP = {"distill": {"iterations": 1000, "lr": 2e-4, "warmup": 0, "ema_rate": 0.995,
                                "init_steps": 16}}
RECOMMENDED_FEW_STEP: dict[str, dict[str, dict[str, Any]]] = {
    "digits": _DIGITS_FEW_STEP,
    "digits-cond": _DIGITS_FEW_STEP,
}


def recommended_for(teacher: str, objective: str = "dkdm",
                    warm_start: bool = False) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} recommended for `teacher`, the objective and whether the student
    starts from trained weights (empty for unregistered specs)."""
    few_step = str(objective) == "consistency" and warm_start
    table = RECOMMENDED_FEW_STEP if few_step else RECOMMENDED
    return table.get(teacher, {})
