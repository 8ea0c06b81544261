"""The model registry: every student and in-house teacher architecture is a named factory
`factory(*, image_size, in_channels, learn_sigma, **overrides) -> nn.Module`."""

from __future__ import annotations

from torch import nn

from dkdm_cli.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
