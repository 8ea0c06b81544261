"""A small MNIST DDPM of our own writing, as a course project or a lab would have it, and the
one function that hands it to dkdm (docs/bring-your-own-teacher.md).

The network is ours, not dkdm's: a two-level UNet that reads the time as t/T with t in 1..T.
The process it was trained with: T = 1000 steps, the cosine schedule, epsilon prediction and
sigma_t^2 = beta_t at sampling.

    dkdm sample  --teacher py:docs/examples/my_ddpm.py:teacher --num 16 --grid teacher.png
    dkdm distill --teacher py:docs/examples/my_ddpm.py:teacher --student unet-n
"""

import math
import os

import torch
from torch import nn

from dkdm_cli.api import denoiser

T = 1000


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in (0, 1], (B,) -> (B, dim)."""
    freqs = torch.exp(torch.arange(dim // 2, device=t.device) * (-math.log(1000.0) / (dim // 2)))
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Block(nn.Module):
    """conv - norm - SiLU, twice, with the time added in between."""

    def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(x)))
        h = h + self.time(t_emb)[:, :, None, None]
        return nn.functional.silu(self.norm2(self.conv2(h)))


class TinyUNet(nn.Module):
    """28x28x1 -> 14x14 -> 7x7 and back, predicting the noise eps."""

    def __init__(self, ch: int = 16, t_dim: int = 32) -> None:
        super().__init__()
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.down1, self.down2 = Block(1, ch, t_dim), Block(ch, 2 * ch, t_dim)
        self.mid = Block(2 * ch, 2 * ch, t_dim)
        self.up2, self.up1 = Block(4 * ch, ch, t_dim), Block(2 * ch, ch, t_dim)
        self.out = nn.Conv2d(ch, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.t_mlp(time_features(t, self.t_dim))
        h1 = self.down1(x, e)                                    # (B, ch, 28, 28)
        h2 = self.down2(nn.functional.avg_pool2d(h1, 2), e)      # (B, 2ch, 14, 14)
        m = self.mid(nn.functional.avg_pool2d(h2, 2), e)         # (B, 2ch, 7, 7)
        u2 = self.up2(torch.cat([nn.functional.interpolate(m, scale_factor=2), h2], 1), e)
        u1 = self.up1(torch.cat([nn.functional.interpolate(u2, scale_factor=2), h1], 1), e)
        return self.out(u1)                                      # (B, 1, 28, 28): eps


def teacher():
    """Our DDPM as a dkdm teacher. MY_DDPM_WEIGHTS names the trained weights (a safetensors
    state dict); without it the network is untrained, which is enough to try the commands."""
    model = TinyUNet()
    weights = os.environ.get("MY_DDPM_WEIGHTS")
    if weights:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))  # strict: every key must match
    return denoiser(
        model,
        sample_shape=(1, 28, 28),
        num_timesteps=T,
        schedule="cosine",
        prediction="epsilon",
        variance="fixed_large",          # sigma_t^2 = beta_t
        timesteps=lambda t: (t + 1) / T,  # dkdm's steps 0..T-1 are our 1..T, read as t/T
    )
