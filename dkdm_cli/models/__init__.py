"""Model families (UNet, DiT) behind one registry and one contract: model(x, t) -> output with
C channels (eps) or 2C (eps plus the learned-range variance interpolation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dkdm_cli.errors import ShapeMismatchError, UserError
from dkdm_cli.models import dit as _dit  # noqa: F401  (registers the DiT presets)
from dkdm_cli.models import unet as _unet  # noqa: F401  (registers the UNet presets)
from dkdm_cli.models.registry import MODELS


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: registry name and the factory's keyword arguments."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of to_dict."""
        return cls(name=d["name"], kwargs=dict(d.get("kwargs", {})))


def create_model(
    name: str, *, image_size: int, in_channels: int, learn_sigma: bool, **overrides
) -> nn.Module:
    """Build a registered model for images of `image_size` x `image_size` x `in_channels`.

    The result carries `.spec`, a ModelSpec that rebuilds it exactly.
    """
    canonical = MODELS.resolve(name)
    kwargs = dict(image_size=image_size, in_channels=in_channels, learn_sigma=learn_sigma, **overrides)
    try:
        model = MODELS.create(canonical, **kwargs)
    except ShapeMismatchError:
        raise
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build model {name!r} with {overrides or 'its defaults'}: {exc}") from exc
    model.spec = ModelSpec(canonical, kwargs)
    return model


def build_from_spec(spec: ModelSpec, *, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model from its spec (weights freshly initialised)."""
    kwargs = dict(spec.kwargs)
    with torch.device(device):
        return create_model(spec.name, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "ModelSpec", "build_from_spec", "count_parameters", "create_model"]
