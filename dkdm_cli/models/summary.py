"""Parameter and FLOP counts of registered models, computed on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkdm_cli.errors import ShapeMismatchError
from dkdm_cli.models import MODELS, count_parameters, create_model


@dataclass(frozen=True)
class ModelSummary:
    """One row of `dkdm students`."""

    name: str
    family: str
    parameters: int | None
    gflops: float | None  # per forward of one image; 2 FLOPs per multiply-add
    fits: bool
    reason: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"name": self.name, "family": self.family, "parameters": self.parameters,
                "gflops": self.gflops, "fits": self.fits, "reason": self.reason}


def summarize(name: str, *, image_size: int, channels: int, learn_sigma: bool = True,
              flops: bool = True, num_classes: int = 0) -> ModelSummary:
    """Parameters and GFLOPs of `name` built for the given image shape (with a label table of
    `num_classes` classes plus a null class, as a class-conditional teacher's student has)."""
    family = MODELS.resolve(name).split("-")[0]  # registry names are "<family>-<size>"
    labels = dict(num_classes=num_classes, class_null=True) if num_classes else {}
    try:
        with torch.device("meta"):
            model = create_model(name, image_size=image_size, in_channels=channels,
                                 learn_sigma=learn_sigma, **labels)
            gflops = None
            if flops:
                x = torch.empty(1, channels, image_size, image_size)
                t = torch.zeros(1, dtype=torch.long)
                with FlopCounterMode(display=False) as counter:
                    model(x, t, *((t,) if labels else ()))
                gflops = counter.get_total_flops() / 1e9
    except ShapeMismatchError as exc:
        return ModelSummary(name, family, None, None, False, str(exc))
    return ModelSummary(name, family, count_parameters(model), gflops, True)


def summarize_all(*, image_size: int, channels: int, learn_sigma: bool = True,
                  flops: bool = True, num_classes: int = 0) -> list[ModelSummary]:
    """A summary of every registered model."""
    return [summarize(n, image_size=image_size, channels=channels, learn_sigma=learn_sigma,
                      flops=flops, num_classes=num_classes) for n in MODELS.names()]
