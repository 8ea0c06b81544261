"""The CNN family: an ADM-style UNet (Dhariwal & Nichol; improved-diffusion) and its presets."""

from __future__ import annotations

import torch
from torch import nn

from dkdm_cli.errors import ShapeMismatchError
from dkdm_cli.models._blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepSequential,
    Upsample,
    label_table,
    norm_layer,
    timestep_embedding,
    zero_module,
)
from dkdm_cli.models.registry import MODELS


class UNet(nn.Module):
    """ADM UNet. forward(x (B, C, H, W), t (B,)[, y (B,)]) -> (B, out_channels, H, W), for any H
    and W that the stride 2**(len(channel_mult) - 1) divides; y are class labels when built with
    num_classes > 0 (ADM's class_cond; `class_null` adds a null row at index num_classes).

    Module names follow improved-diffusion's UNetModel, so its checkpoints map onto this class
    by renaming only the attention projections (see teachers/adm.py). improved-diffusion has no
    `resblock_updown` (its CIFAR-10 model is `unet-b` with resblock_updown=False: 52,546,438
    parameters, checked against its code); guided-diffusion and the DKDM reference code resample
    inside ResBlocks, which is what the unet-s/m/b presets do.
    """

    def __init__(
        self, *, image_size: int, in_channels: int, model_channels: int, out_channels: int,
        num_res_blocks: int, attention_resolutions: tuple[int, ...] = (), dropout: float = 0.0,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_heads: int = 4,
        num_head_channels: int = -1, use_scale_shift_norm: bool = True,
        resblock_updown: bool = False, conv_resample: bool = True, num_classes: int = 0,
        class_null: bool = False,
    ) -> None:
        # Every constructor argument as given: a diffusers export rebuilds this exact network
        # from them (dkdm_cli/diffusers_export), where a ModelSpec names only the preset.
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.stride = 2 ** (len(channel_mult) - 1)
        emb_dim = model_channels * 4
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Class-conditional: ADM adds a label embedding to the timestep embedding (same key name).
        self.num_classes = num_classes
        self.null_class = num_classes if class_null else None
        self.label_emb = label_table(num_classes, emb_dim, null=class_null)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels)

        def res(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, emb_dim, dropout, out_channels=out,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList(
            [TimestepSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample)
                self.input_blocks.append(TimestepSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(*layers))
        self.out = nn.Sequential(
            norm_layer(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the output for noisy x at (original-scale) timesteps t (and class labels y (B,)
        for a class-conditional UNet)."""
        if x.shape[-1] % self.stride or x.shape[-2] % self.stride:
            raise ShapeMismatchError(
                f"input {tuple(x.shape[-2:])} is not divisible by the UNet's stride {self.stride}"
            )
        if x.shape[1] != self.in_channels:
            raise ShapeMismatchError(f"this UNet takes {self.in_channels} channels, got {x.shape[1]}")
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))  # (B, 4mc)
        if (y is None) != (self.label_emb is None):
            raise ShapeMismatchError("class labels are required by a class-conditional UNet and "
                                     "refused by an unconditional one")
        if self.label_emb is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)  # (B, 4mc)
        hs = []  # every input block's output, consumed in reverse by the output blocks
        h = x
        for block in self.input_blocks:
            h = block(h, emb)  # (B, C_level, H/ds, W/ds)
            hs.append(h)
        h = self.middle_block(h, emb)  # (B, C_mid, H/s, W/s)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)  # (B, C_level, H/ds, W/ds)
        return self.out(h)  # (B, out_channels, H, W)


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """improved-diffusion's per-resolution channel multipliers (extended to small images)."""
    if image_size >= 256:
        return (1, 1, 2, 2, 4, 4)
    if image_size >= 128:
        return (1, 1, 2, 3, 4)
    if image_size >= 64:
        return (1, 2, 3, 4)
    if image_size >= 32:
        return (1, 2, 2, 2)
    return (1, 2, 2)


def _attention_ds(image_size: int, channel_mult: tuple[int, ...],
                  widths: tuple[int, ...] = (16, 8)) -> tuple[int, ...]:
    """Downsample factors (ds) of the levels whose feature map is 16x16 or 8x8 (`widths`).

    This is improved-diffusion's default attention_resolutions="16,8" (at 32px: ds 2 and 4).
    Only the ds a level actually has are returned (1, 2, 4, ...): image_size // 8 for a 24px image
    is 3, which no level has, and would silently drop attention. When no level is 16 or 8 pixels
    wide the deepest level gets attention, so every UNet attends somewhere besides its middle.
    """
    level_ds = [2**level for level in range(len(channel_mult))]
    chosen = tuple(ds for ds in level_ds if image_size // ds in widths and image_size % ds == 0)
    return chosen or (level_ds[-1],)


def _unet_preset(channels: int, blocks: int, dropout: float, *, heads: int = 4, updown: bool = False,
                 attention_widths: tuple[int, ...] = (16, 8)):
    """A registry factory for a UNet of `channels` base width and `blocks` res blocks per level,
    attending at the levels whose feature maps are `attention_widths` pixels wide."""

    def factory(*, image_size: int, in_channels: int, learn_sigma: bool, **overrides) -> UNet:
        mult = tuple(overrides.pop("channel_mult", default_channel_mult(image_size)))
        kwargs = dict(
            image_size=image_size, in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            model_channels=channels, num_res_blocks=blocks, dropout=dropout,
            channel_mult=mult, attention_resolutions=_attention_ds(image_size, mult, attention_widths),
            num_heads=heads, resblock_updown=updown,
        )
        kwargs.update(overrides)
        kwargs["attention_resolutions"] = tuple(kwargs["attention_resolutions"])
        stride = 2 ** (len(mult) - 1)
        if image_size % stride:
            raise ShapeMismatchError(
                f"image size {image_size} is not divisible by this UNet's stride {stride}; "
                "pass a shorter channel_mult"
            )
        return UNet(**kwargs)

    return factory


# Preset defaults are part of the model-file format: a file records only the factory's arguments,
# so a released preset must never change (tests pin their parameter counts).
# unet-t is the built-in digits teacher (16x16x1: 679,226 parameters); it keeps improved-diffusion's
# conv resampling. The larger presets resample inside ResBlocks as guided-diffusion and the DKDM
# reference code do (the 10.7M teacher and 1.9M student measured from it only count out that way);
# counts at 32x32x3 with learned variance:
MODELS.register("unet-t")(_unet_preset(24, 1, 0.0, heads=2))  # 0.95M: tests and CPU demos
# unet-n: the digits demo's student, 0.30M at 16x16x1 (0.44x unet-t); attention only at 8x8, where
# unet-t's 16x16 attention costs a third of its forward on a CPU: 2.8x unet-t's img/s there.
MODELS.register("unet-n")(_unet_preset(16, 1, 0.0, heads=2, attention_widths=(8,)))
MODELS.register("unet-s")(_unet_preset(64, 3, 0.1, updown=True))  # 14.3M
MODELS.register("unet-m")(_unet_preset(96, 2, 0.1, updown=True))  # 24.9M
MODELS.register("unet-b")(_unet_preset(128, 3, 0.3, updown=True))  # 57.1M: the paper's CIFAR-10 teacher
