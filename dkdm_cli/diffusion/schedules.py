"""Beta schedules. Named schedules never change once released: add a new name instead."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dkdm_cli.errors import ConfigError

SCHEDULES = ("linear", "scaled_linear", "cosine")


def linear_betas(num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM's linear schedule: betas evenly spaced from beta_start to beta_end."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, *, beta_start: float = 0.0015, beta_end: float = 0.0195
) -> np.ndarray:
    """LDM's schedule (called "linear" in the LDM code): sqrt(beta) evenly spaced, then squared."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, *, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2)."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def make_betas(
    schedule: str,
    num_timesteps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    betas: Sequence[float] | None = None,
) -> np.ndarray:
    """Betas for a named schedule, or the explicit `betas` when schedule == "explicit"."""
    if schedule == "explicit":
        if betas is None:
            raise ConfigError("schedule 'explicit' needs a list of betas")
        arr = np.asarray(betas, dtype=np.float64)
    elif schedule == "cosine":
        arr = cosine_betas(num_timesteps)
    elif schedule in ("linear", "scaled_linear"):
        fn = linear_betas if schedule == "linear" else scaled_linear_betas
        kw = {}
        if beta_start is not None:
            kw["beta_start"] = beta_start
        if beta_end is not None:
            kw["beta_end"] = beta_end
        arr = fn(num_timesteps, **kw)
    else:
        raise ConfigError(
            f"unknown noise schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}, explicit"
        )
    if arr.ndim != 1 or len(arr) < 1 or not np.all((arr > 0) & (arr < 1)):
        raise ConfigError("betas must be a non-empty list of numbers strictly between 0 and 1")
    return arr
