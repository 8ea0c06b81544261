"""Building blocks shared by the model families, on timm layers where timm has the piece."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [cos | sin] as in ADM and DiT."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb  # (B, dim)


def label_table(num_classes: int, dim: int, *, null: bool) -> nn.Embedding | None:
    """The class-label embedding of a conditional model: `num_classes` rows, plus a null row at
    index `num_classes` when `null` (classifier-free guidance's "no class", as DiT lays it out);
    None for an unconditional model (num_classes 0)."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if null and not num_classes:
        raise ValueError("a null class needs num_classes > 0")
    return nn.Embedding(num_classes + int(null), dim) if num_classes else None


def _in_input_dtype(op, x: torch.Tensor) -> torch.Tensor:
    """op() with autocast off where it is on: autocast would run a norm on a float32 copy."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return op()
    return op()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 parameters, normalising in the activation dtype.

    ADM normalised a float32 copy because half-precision statistics are unstable; today's
    kernels (CPU and CUDA) accumulate the statistics of bf16/fp16 inputs in float32, so the
    result matches that copy to the input's rounding (tests/test_precision.py) without the two
    full-size dtype copies per call. The parameters stay float32 when a network is cast
    (`keep_float32`, dkdm_cli/precision.py) and are cast (C values) to the input's dtype here.
    """

    keep_float32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (B, C, ...) in x's dtype (float32 accumulation inside the kernel)."""
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        return _in_input_dtype(lambda: F.group_norm(x, self.num_groups, weight, bias, self.eps), x)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm like GroupNorm32: float32 parameters (if any), computed in the activation
    dtype, so a DiT's residual stream stays in the autocast dtype."""

    keep_float32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension of x in x's dtype."""
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _in_input_dtype(
            lambda: F.layer_norm(x, self.normalized_shape, weight, bias, self.eps), x)


def norm_layer(channels: int, groups: int = 32) -> GroupNorm32:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return GroupNorm32(math.gcd(groups, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters (residual branches start as the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the children in order; TimestepBlocks also get emb (B, D_emb)."""
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.conv is not None else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv (or average pooling)."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.op(x)  # (B, C, H/2, W/2)


class ResBlock(TimestepBlock):
    """ADM residual block: GN-SiLU-conv, timestep scale-shift (or add), GN-SiLU-dropout-conv.

    With `up`/`down` the block also resamples (guided-diffusion's resblock_updown).
    """

    def __init__(
        self, channels: int, emb_channels: int, dropout: float, *, out_channels: int | None = None,
        use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            norm_layer(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            norm_layer(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), emb (B, D_emb) -> (B, C_out, H', W'), H' = H, 2H or H/2."""
        if self.updown:
            # Resample between the norm-activation and the conv, as guided-diffusion does.
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)  # (B, C_out, H, W)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]  # (B, 2C_out or C_out, 1, 1)
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention over H*W tokens with timm's Attention, residual, zero-init output."""

    def __init__(self, channels: int, *, num_heads: int = 1, num_head_channels: int = -1) -> None:
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} heads")
        self.norm = norm_layer(channels)
        self.attn = Attention(channels, num_heads=num_heads, qkv_bias=True)
        zero_module(self.attn.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): x plus attention over its H*W positions."""
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + out
