"""The ViT family: DiT (Peebles & Xie) with adaLN-Zero blocks on timm's Attention, Mlp and
PatchEmbed, a fixed 2-D sin-cos position embedding, and optionally DiT's class-label table (with
a null row for classifier-free guidance) added to the timestep embedding."""

from __future__ import annotations

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from dkdm_cli.errors import ShapeMismatchError
from dkdm_cli.models._blocks import LayerNorm32, label_table, timestep_embedding
from dkdm_cli.models.registry import MODELS


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed position embedding: half the channels encode x, half y."""
    if dim % 4:
        raise ValueError(f"DiT hidden size must be divisible by 4, got {dim}")

    def one_axis(d: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))  # (d/2,)
        out = pos.reshape(-1, 1) * omega[None]  # (M, d/2)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, d)

    coords = torch.arange(grid, dtype=torch.float64)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")  # w varies fastest, as in DiT
    return torch.cat([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x * (1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on the timestep embedding."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = LayerNorm32(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens x (B, N, D) conditioned on c (B, D) -> (B, N, D)."""
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))  # (B, N, D)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    """forward(x (B, C, H, W), t (B,)[, y (B,)]) -> (B, out_channels, H, W)."""

    def __init__(
        self, *, image_size: int, in_channels: int, out_channels: int, patch_size: int,
        hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
        frequency_embedding_size: int = 256, num_classes: int = 0, class_null: bool = False,
    ) -> None:
        # Every constructor argument as given: a diffusers export rebuilds this exact network
        # from them (dkdm_cli/diffusers_export), where a ModelSpec names only the preset.
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        if image_size % patch_size:
            raise ShapeMismatchError(
                f"patch size {patch_size} does not divide image size {image_size}; "
                "choose a student with a smaller patch (e.g. dit-s/2)"
            )
        if hidden_size % num_heads:
            # timm's Attention only asserts this; a ValueError becomes a clear UserError upstream.
            raise ValueError(f"hidden size {hidden_size} does not split into {num_heads} heads")
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.patch_size, self.freq_dim = patch_size, frequency_embedding_size
        self.x_embedder = PatchEmbed(image_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.num_classes = num_classes
        self.null_class = num_classes if class_null else None
        self.y_embedder = label_table(num_classes, hidden_size, null=class_null)
        grid = image_size // patch_size
        self.register_buffer(
            "pos_embed",
            sincos_pos_embed_2d(hidden_size, grid)[None],  # (1, N, D)
            persistent=False,
        )
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = LayerNorm32(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        # adaLN-Zero: every block and the output start as the identity / zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_adaLN[-1], self.final_linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, H, W) image."""
        p, c = self.patch_size, self.out_channels
        g = self.image_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the output for noisy x at (original-scale) timesteps t (and class labels y (B,)
        for a class-conditional DiT)."""
        # The position embedding fixes the token grid, so only the built size is accepted.
        if tuple(x.shape[-3:]) != (self.in_channels, self.image_size, self.image_size):
            raise ShapeMismatchError(
                f"this DiT was built for {self.in_channels}x{self.image_size}x{self.image_size} "
                f"inputs, got {tuple(x.shape[-3:])}"
            )
        h = self.x_embedder(x)  # (B, N, D), in the autocast dtype under autocast
        h = h + self.pos_embed.to(h.dtype)  # the residual stream keeps that dtype
        c = self.t_embedder(timestep_embedding(t, self.freq_dim).to(x.dtype))  # (B, D)
        if (y is None) != (self.y_embedder is None):
            raise ShapeMismatchError("class labels are required by a class-conditional DiT and "
                                     "refused by an unconditional one")
        if self.y_embedder is not None:
            c = c + self.y_embedder(y).to(c.dtype)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        h = self.final_linear(modulate(self.final_norm(h), shift, scale))  # (B, N, p*p*C_out)
        return self.unpatchify(h)  # (B, C_out, H, W)


def _dit_preset(depth: int, hidden: int, heads: int, patch: int):
    """A registry factory for a DiT of the given depth, width, heads and patch size."""

    def factory(*, image_size: int, in_channels: int, learn_sigma: bool, **overrides) -> DiT:
        kwargs = dict(
            image_size=image_size, in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
        )
        kwargs.update(overrides)
        return DiT(**kwargs)

    return factory


# Depth / width / heads as in the DiT paper; dit-t and dit-n are ours, for tests and CPU demos
# (dit-n/2: 0.33M parameters at 16x16x1, half the built-in digits teacher, the default student).
_DIT_SIZES = {"n": (4, 64, 4), "t": (4, 128, 4), "s": (12, 384, 6), "b": (12, 768, 12),
              "l": (24, 1024, 16), "xl": (28, 1152, 16)}
_DIT_PATCHES = {"n": (2, 4), "t": (2, 4), "s": (2, 4), "b": (2, 4), "l": (2,), "xl": (2,)}
for _size, (_depth, _hidden, _heads) in _DIT_SIZES.items():
    for _patch in _DIT_PATCHES[_size]:
        MODELS.register(f"dit-{_size}/{_patch}", aliases=(f"dit-{_size}",) if _patch == 2 else ())(
            _dit_preset(_depth, _hidden, _heads, _patch)
        )
