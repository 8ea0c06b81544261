"""Reading one diffusers component folder (unet/, vqvae/, vae/ or a bare model folder) into its
diffusers class, strictly and without unpickling anything but tensors.

Weights, in order of preference:
  diffusion_pytorch_model.safetensors            (or its sharded index, or an fp32/other variant)
  diffusion_pytorch_model.bin                    (or its sharded index)
`.bin` files, the format the google/ddpm-* and CompVis/ldm-* repos were published in, are read with
`torch.load(weights_only=True)`, as diffusers itself reads them: tensors and plain containers only,
so a file that needs anything else is refused, never executed. The model is built from its
config.json with its parameters on the meta device (no random initialisation; buffers are built
for real, so non-persistent ones such as DiT's sin-cos position table are computed by diffusers
itself, as its own loader does), every key and shape is checked (legacy attention names such as
`query`/`proj_attn` are renamed as diffusers does), and the weights are assigned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _console
from dkdm_cli.errors import ModelFileError, TeacherError
from dkdm_cli.tensorfile import read_tensor_dict

WEIGHT_STEM = "diffusion_pytorch_model"
SAFETENSORS = f"{WEIGHT_STEM}.safetensors"
BIN = f"{WEIGHT_STEM}.bin"
# Names diffusers used for attention projections before its Attention class (diffusers < 0.14).
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Training-only modules an LDM/taming first-stage checkpoint may carry (LPIPS, discriminator):
# they never take part in decoding, so they are dropped, loudly. Anything else unexpected is an error.
TRAINING_ONLY_PREFIXES = ("loss.",)


def read_config(path: Path) -> dict[str, Any]:
    """A component's raw config.json (what the file says, without diffusers' defaults)."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))  # JSON is UTF-8 (RFC 8259)
    except UnicodeDecodeError as exc:
        raise ModelFileError(f"{path}: not a JSON config (not UTF-8 text: {exc.reason} at byte "
                             f"{exc.start})") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: not a JSON object")
    return config


def _index_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` lists (in a stable order)."""
    doc = read_config(index)
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{index}: no weight_map in this shard index")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def weight_files(component: Path) -> list[Path]:
    """The files holding a component's weights: safetensors when present, else `.bin`."""
    component = Path(component)
    for name in (SAFETENSORS, BIN):
        if (component / name).is_file():
            return [component / name]
        if (component / f"{name}.index.json").is_file():
            return _index_files(component / f"{name}.index.json")
        if name == SAFETENSORS:
            variants = sorted(component.glob(f"{WEIGHT_STEM}.*.safetensors"))
            if variants:  # e.g. diffusion_pytorch_model.fp32.safetensors; fp32 preferred
                fp32 = [p for p in variants if p.name == f"{WEIGHT_STEM}.fp32.safetensors"]
                return fp32 or variants[:1]
    others = sorted(p.name for p in component.iterdir() if p.suffix in (".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(others)}: not a diffusers weights file)" if others else ""
    raise TeacherError(f"{component}: no {SAFETENSORS} or {BIN} weights{hint}")


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through torch.load(weights_only=True); anything else is refused."""
    return read_tensor_dict(path, what="tensor state dict")


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of a component's weight files, on the CPU."""
    from dkdm_cli.models.io import read_safetensors

    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            tensors, _ = read_safetensors(path)
        else:
            tensors = _read_bin(path)
        state.update(tensors)
    return state


def rename_legacy_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Old diffusers attention names (`<block>.query.weight`, `proj_attn`, ...) renamed to the
    current ones, only where the new name is expected and the old one is not."""
    out = {}
    for key, value in state.items():
        new = key
        if key not in expected:
            parts = key.split(".")
            if len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
                candidate = ".".join([*parts[:-2], LEGACY_ATTENTION[parts[-2]], parts[-1]])
                if candidate in expected:
                    new = candidate
        out[new] = value
    return out


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device (no memory, and initialisation
    is free); buffers stay where they are built. accelerate's init_empty_weights(include_buffers=
    False), which diffusers' own loader uses, does the same."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_on_meta(cls: type, config: dict[str, Any], *, source: str) -> nn.Module:
    """A diffusers model from its config, with every parameter on the meta device (buffers real)."""
    try:
        with parameters_on_meta():
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        raise TeacherError(f"{source}: diffusers cannot build this {cls.__name__} ({exc})") from exc


def load_component(cls: type, component: Path, *, config: dict[str, Any] | None = None) -> nn.Module:
    """`cls` built from `component/config.json` with the folder's weights, strictly, in float32."""
    from dkdm_cli.models.io import load_state_strict

    component = Path(component)
    config = config if config is not None else read_config(component / "config.json")
    model = build_on_meta(cls, config, source=str(component))
    state = read_weights(weight_files(component))
    expected = set(model.state_dict())
    extra = sorted(k for k in state if k not in expected and k.startswith(TRAINING_ONLY_PREFIXES))
    if extra:
        _console.warn(f"{component}: ignoring {len(extra)} training-only tensors "
                      f"({', '.join(sorted({k.split('.')[0] + '.' for k in extra}))}*)")
        state = {k: v for k, v in state.items() if k not in set(extra)}
    state = rename_legacy_keys(state, expected)
    state = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    load_state_strict(model, state, source=str(component), assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a parameter the state dict does not hold (load_state_strict names those first)
        raise TeacherError(f"{component}: {cls.__name__} has tensors no weights file provides: "
                           f"{', '.join(left[:5])}")
    return model.eval().requires_grad_(False)
