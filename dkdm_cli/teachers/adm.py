"""Teachers from openai's improved-diffusion / guided-diffusion ("ADM") `.pt` state dicts.

The checkpoint is read with `torch.load(weights_only=True)` (no arbitrary unpickling). Its
architecture is not stored in it, so it comes from a named preset (`--teacher-arch`, config
`teacher.arch`) and/or flags in `teacher.arch_kwargs` that use the libraries' own flag names
(`num_channels`, `attention_resolutions = "16,8"`, `learn_sigma`, ...).

Our UNet (models/unet.py) names its modules as ADM's UNetModel does, except attention:
  ADM   <block>.qkv  Conv1d(C, 3C, 1), <block>.proj_out Conv1d(C, C, 1)
  dkdm  <block>.attn.qkv Linear(C, 3C), <block>.attn.proj Linear(C, C)   (timm Attention)
ADM's default ("legacy") QKV attention orders the 3C qkv channels as (heads, 3, head_dim); timm
as (3, heads, head_dim), so those rows are permuted. guided-diffusion's use_new_attention_order
already uses timm's order. Every key must match: a missing, extra or mis-shaped weight is an
error that names it, in ADM's own key names.

class_cond=True (ImageNet's 1000 labels, both libraries' NUM_CLASSES) adds ADM's
`label_emb.weight` (1000, 4 * num_channels), same name and layout in our UNet; the teacher then
takes labels 0..999. These checkpoints have no null label, so no classifier-free guidance.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import ModelFileError, TeacherError
from dkdm_cli.models._blocks import AttentionBlock
from dkdm_cli.models.unet import UNet
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.tensorfile import read_tensor_dict


@dataclass(frozen=True)
class ADMFlags:
    """improved-diffusion's model/diffusion flags (defaults: its model_and_diffusion_defaults),
    plus guided-diffusion's additions. Flags that only affect training or sampling speed
    (use_kl, rescale_learned_sigmas, use_checkpoint, use_fp16, timestep_respacing) are accepted
    and ignored: distillation always uses the full T-step process in dkdm's precision."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    num_head_channels: int = -1  # guided-diffusion
    attention_resolutions: str = "16,8"
    channel_mult: str = ""  # guided-diffusion; "" = the libraries' default for image_size
    dropout: float = 0.0
    learn_sigma: bool = False
    sigma_small: bool = False
    class_cond: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = True  # improved-diffusion's default; guided-diffusion's is False
    rescale_learned_sigmas: bool = True
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False  # guided-diffusion
    use_fp16: bool = False  # guided-diffusion
    use_new_attention_order: bool = False  # guided-diffusion


_GUIDED = {"rescale_timesteps": False, "rescale_learned_sigmas": False}
# Named architectures: overrides of ADMFlags' defaults. Public checkpoints cite their README flags.
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "improved-diffusion": {},
    "guided-diffusion": dict(_GUIDED),
    # openai/improved-diffusion README, cifar10_uncond_50M_500K.pt
    "iddpm-cifar10": dict(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                          dropout=0.3, diffusion_steps=4000, noise_schedule="cosine"),
    # openai/guided-diffusion README, 256x256_diffusion_uncond.pt
    "adm-256-uncond": dict(_GUIDED, image_size=256, num_channels=256, num_res_blocks=2,
                           attention_resolutions="32,16,8", num_head_channels=64,
                           resblock_updown=True, learn_sigma=True, noise_schedule="linear",
                           diffusion_steps=1000, use_fp16=True, use_scale_shift_norm=True),
    # Class-conditional ImageNet (1000 labels, no null label). openai/improved-diffusion README,
    # imagenet64_cond_270M_250K.pt ("Class-conditional ImageNet-64 model (270M parameters)")
    "iddpm-imagenet64-cond": dict(image_size=64, num_channels=192, num_res_blocks=3,
                                  learn_sigma=True, class_cond=True, diffusion_steps=4000,
                                  noise_schedule="cosine", rescale_learned_sigmas=False,
                                  rescale_timesteps=False),
    # openai/guided-diffusion README ("Classifier guidance" MODEL_FLAGS), 64x64_diffusion.pt
    "adm-64-cond": dict(_GUIDED, image_size=64, num_channels=192, num_res_blocks=3,
                        attention_resolutions="32,16,8", num_head_channels=64, resblock_updown=True,
                        use_new_attention_order=True, learn_sigma=True, class_cond=True,
                        dropout=0.1, noise_schedule="cosine", diffusion_steps=1000, use_fp16=True,
                        use_scale_shift_norm=True),
    # openai/guided-diffusion README, 128x128_diffusion.pt
    "adm-128-cond": dict(_GUIDED, image_size=128, num_channels=256, num_res_blocks=2,
                         attention_resolutions="32,16,8", num_heads=4, resblock_updown=True,
                         learn_sigma=True, class_cond=True, noise_schedule="linear",
                         diffusion_steps=1000, use_fp16=True, use_scale_shift_norm=True),
    # openai/guided-diffusion README, 256x256_diffusion.pt
    "adm-256-cond": dict(_GUIDED, image_size=256, num_channels=256, num_res_blocks=2,
                         attention_resolutions="32,16,8", num_head_channels=64,
                         resblock_updown=True, learn_sigma=True, class_cond=True,
                         noise_schedule="linear", diffusion_steps=1000, use_fp16=True,
                         use_scale_shift_norm=True),
}
# improved-diffusion's channel multipliers (32, 64, 256) and guided-diffusion's (128).
_DEFAULT_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
_ADM_GROUPS = 32  # ADM's normalization() is always GroupNorm(32, C)
# script_util.NUM_CLASSES of both libraries: class_cond means ImageNet's 1000 labels, embedded by
# label_emb = nn.Embedding(1000, 4 * num_channels) and added to the timestep embedding. There is no
# null label (they were trained without label dropout), so no classifier-free guidance.
NUM_CLASSES = 1000
_TRUE, _FALSE = {"true", "t", "yes", "y", "1"}, {"false", "f", "no", "n", "0"}


def _coerce(name: str, value: Any, default: Any) -> Any:
    """A flag value (from TOML or a --set string) to the flag's type, or a TeacherError."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            return float(value)
        if isinstance(value, (list, tuple)):
            return ",".join(str(int(v)) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise TeacherError(f"arch flag {name}={value!r}: expected a {kind.__name__}") from None


def resolve_flags(arch: str = "", arch_kwargs: dict[str, Any] | None = None) -> ADMFlags:
    """ADMFlags from a preset name and flag overrides (unknown names are errors)."""
    arch_kwargs = dict(arch_kwargs or {})
    if not arch and not arch_kwargs:
        raise TeacherError(
            "an improved/guided-diffusion .pt checkpoint does not record its architecture: give "
            f"--teacher-arch (one of {', '.join(ADM_PRESETS)}) and/or teacher.arch_kwargs with "
            "the flags it was trained with (num_channels, num_res_blocks, ...)"
        )
    if arch and arch not in ADM_PRESETS:
        close = difflib.get_close_matches(arch, list(ADM_PRESETS), n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise TeacherError(f"unknown ADM architecture {arch!r}.{hint} Known: {', '.join(ADM_PRESETS)}")
    defaults = {f.name: f.default for f in fields(ADMFlags)}
    unknown = sorted(set(arch_kwargs) - set(defaults))
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, defaults, n=1))
                 else k for k in unknown]
        raise TeacherError(f"unknown ADM flags: {', '.join(hints)}")
    values = dict(ADM_PRESETS[arch or "improved-diffusion"])
    values.update({k: _coerce(k, v, defaults[k]) for k, v in arch_kwargs.items()})
    return ADMFlags(**values)


def _ints(name: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise TeacherError(f"arch flag {name}={text!r}: expected comma-separated integers") from None


def unet_kwargs(flags: ADMFlags) -> dict[str, Any]:
    """Our UNet's constructor arguments for these flags (ADM's create_model, checked)."""
    size = flags.image_size
    if flags.channel_mult:
        mult = _ints("channel_mult", flags.channel_mult)
    elif size in _DEFAULT_MULT:
        mult = _DEFAULT_MULT[size]
    else:
        raise TeacherError(f"no default channel_mult for image_size {size}; give channel_mult")
    if not mult or mult[0] != 1:
        raise TeacherError(f"channel_mult {mult} is not supported (the first multiplier must be 1)")
    bad = sorted({flags.num_channels * m for m in mult if (flags.num_channels * m) % _ADM_GROUPS})
    if bad:
        raise TeacherError(f"channel counts {bad} are not divisible by ADM's {_ADM_GROUPS} norm groups")
    if flags.num_head_channels == -1 and flags.num_heads_upsample not in (-1, flags.num_heads):
        raise TeacherError("num_heads_upsample different from num_heads is not supported")
    attention_ds = tuple(size // r for r in _ints("attention_resolutions", flags.attention_resolutions))
    return dict(image_size=size, in_channels=3, model_channels=flags.num_channels,
                out_channels=6 if flags.learn_sigma else 3, num_res_blocks=flags.num_res_blocks,
                attention_resolutions=attention_ds, dropout=flags.dropout, channel_mult=mult,
                num_heads=flags.num_heads, num_head_channels=flags.num_head_channels,
                use_scale_shift_norm=flags.use_scale_shift_norm,
                resblock_updown=flags.resblock_updown, conv_resample=True,
                num_classes=NUM_CLASSES if flags.class_cond else 0, class_null=False)


def build_unet(flags: ADMFlags, *, device: torch.device | str = "cpu") -> UNet:
    """Our UNet with the architecture ADM's create_model builds for these flags."""
    try:
        with torch.device(device):
            return UNet(**unet_kwargs(flags))
    except ValueError as exc:  # e.g. channels that do not split into the heads
        raise TeacherError(f"cannot build this ADM architecture: {exc}") from exc


def diffusion_settings(flags: ADMFlags) -> DiffusionSettings:
    """The noise process ADM's create_gaussian_diffusion builds for these flags."""
    steps = flags.diffusion_steps
    if flags.noise_schedule == "linear":  # improved-diffusion scales the DDPM range to T steps
        scale = 1000.0 / steps
        schedule = dict(schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif flags.noise_schedule == "cosine":
        schedule = dict(schedule="cosine")
    else:
        raise TeacherError(f"unknown noise_schedule {flags.noise_schedule!r} (linear or cosine)")
    if flags.learn_sigma:
        variance = "learned_range"
    else:
        variance = "fixed_small" if flags.sigma_small else "fixed_large"
    return DiffusionSettings(
        num_timesteps=steps, prediction="sample" if flags.predict_xstart else "epsilon",
        variance=variance, clip_denoised=True,
        timestep_scale=1000.0 / steps if flags.rescale_timesteps else 1.0, **schedule,
    )


# -- key mapping ------------------------------------------------------------------------------

_OURS_RE = re.compile(r"^(?P<block>.+)\.attn\.(?P<name>qkv|proj)\.(?P<kind>weight|bias)$")
_ADM_RE = re.compile(r"^(?P<block>.+)\.(?P<name>qkv|proj_out)\.(?P<kind>weight|bias)$")


def _attention_heads(model: torch.nn.Module) -> dict[str, int]:
    """Module path -> head count of every attention block."""
    return {name: m.attn.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


def _adm_name(key: str) -> str:
    m = _OURS_RE.match(key)
    if not m:
        return key
    return f"{m['block']}.{'qkv' if m['name'] == 'qkv' else 'proj_out'}.{m['kind']}"


def _permute_qkv(t: torch.Tensor, heads: int, *, to_timm: bool) -> torch.Tensor:
    """Reorder qkv rows between ADM's legacy (heads, 3, d) and timm's (3, heads, d) layouts."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    src = (heads, 3, d) if to_timm else (3, heads, d)
    return t.reshape(*src, *rest).transpose(0, 1).reshape(3 * heads * d, *rest)


def expected_adm_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes ADM's UNetModel has for the architecture of `model`."""
    out = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if _OURS_RE.match(key) and key.endswith("weight"):
            shape = (*shape, 1)  # Conv1d(kernel 1) weights
        out[_adm_name(key)] = shape
    return out


def from_adm_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, *, new_attention_order: bool = False
) -> dict[str, torch.Tensor]:
    """An ADM state dict renamed and reshaped for our UNet `model` (keys checked by the caller)."""
    heads = _attention_heads(model)
    out = {}
    for key, value in state.items():
        m = _ADM_RE.match(key)
        if not m or m["block"] not in heads:
            out[key] = value
            continue
        if m["kind"] == "weight":
            value = value.squeeze(-1)  # (out, in, 1) -> (out, in)
        if m["name"] == "qkv" and not new_attention_order:
            value = _permute_qkv(value, heads[m["block"]], to_timm=True)
        out[f"{m['block']}.attn.{'qkv' if m['name'] == 'qkv' else 'proj'}.{m['kind']}"] = value
    return out


def to_adm_state_dict(
    model: torch.nn.Module, *, new_attention_order: bool = False
) -> dict[str, torch.Tensor]:
    """Our UNet's weights under ADM's key names and shapes (the inverse of from_adm_state_dict)."""
    heads = _attention_heads(model)
    out = {}
    for key, value in model.state_dict().items():
        m = _OURS_RE.match(key)
        if m:
            if m["name"] == "qkv" and not new_attention_order:
                value = _permute_qkv(value, heads[m["block"]], to_timm=False)
            if m["kind"] == "weight":
                value = value.unsqueeze(-1)
        out[_adm_name(key)] = value.detach().clone()
    return out


def check_adm_keys(state: dict[str, torch.Tensor], model: torch.nn.Module, *, source: str) -> None:
    """Strict comparison in ADM's naming; ModelFileError naming every difference class."""
    expected = expected_adm_shapes(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in set(expected) & set(state)
                   if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{label}: {', '.join(keys[:5])}{more}")
    raise ModelFileError(f"{source}: weights do not match the ADM architecture; " + "; ".join(parts)
                         + _mismatch_hint(missing, unexpected, wrong))


def _mismatch_hint(missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """What to change when the keys differ: class_cond first (label_emb), else the shape flags."""
    if "label_emb.weight" in unexpected:
        return ("; the checkpoint is class-conditional (it has label_emb): set class_cond=true in "
                "teacher.arch_kwargs or use a class-conditional preset (adm-64-cond, adm-128-cond, "
                "adm-256-cond, iddpm-imagenet64-cond)")
    if "label_emb.weight" in missing:
        return ("; the architecture is class-conditional (class_cond) but the checkpoint has no "
                "label_emb: it is unconditional, set class_cond=false")
    if any(w.startswith("label_emb.weight") for w in wrong):
        return (f"; ADM's class-conditional models embed {NUM_CLASSES} labels "
                "(label_emb.weight is (1000, 4 * num_channels)); other class counts are not ADM's")
    return ("; check --teacher-arch / teacher.arch_kwargs (num_channels, num_res_blocks, "
            "attention_resolutions, learn_sigma, ...)")


def read_adm_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict from an ADM .pt file, without arbitrary unpickling."""
    obj = read_tensor_dict(Path(path), what="state dict")
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_adm_teacher(
    path: Path, *, arch: str = "", arch_kwargs: dict[str, Any] | None = None, device: str = "cpu"
) -> Teacher:
    """A teacher from an improved/guided-diffusion state dict and its architecture flags."""
    flags = resolve_flags(arch, arch_kwargs)
    settings = diffusion_settings(flags)
    model = build_unet(flags, device="meta")  # no random init: every weight comes from the file
    state = read_adm_checkpoint(Path(path))
    check_adm_keys(state, model, source=str(path))
    ours = from_adm_state_dict(state, model, new_attention_order=flags.use_new_attention_order)
    ours = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    return Teacher(
        name=Path(path).stem, model=model, settings=settings,
        sample_shape=(3, flags.image_size, flags.image_size), source=str(path),
        info={"format": "adm", "arch": arch, "flags": dataclasses.asdict(flags)},
    ).to(device)
