"""Resolving --device."""

from __future__ import annotations

import torch

from dkdm_cli.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda when available else cpu; an unavailable device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device
