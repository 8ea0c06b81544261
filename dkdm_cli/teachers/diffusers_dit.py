"""Class-conditional DiT teachers in diffusers format (facebook/DiT-XL-2-256 and any folder laid
out like it): transformer/ holding a DiTTransformer2DModel, or a Transformer2DModel configured as
DiT (patch_size set, norm_type "ada_norm_zero", num_embeds_ada_norm = the number of classes),
which diffusers' own loader remaps to DiTTransformer2DModel. The network runs through diffusers'
module itself, so its function is diffusers' (and, for the converted checkpoints, DiT's).

Labels. Each block's AdaLayerNormZero embeds the label with a LabelEmbedding of
num_embeds_ada_norm + 1 rows when its class dropout is > 0 (diffusers builds it with 0.1, DiT's
training value): the extra row, index num_embeds_ada_norm, is the "dropped" label, i.e. the null
class of classifier-free guidance (DiTPipeline samples with class_null = 1000). Both numbers are
read from the built module, not assumed.

Output: out_channels = 2 x in_channels means a learned variance (DiT's learn_sigma) read as
learned_range, as DiT's diffusion does; the DDIM scheduler config the hub repos carry has no
variance_type, so the folder loader infers it from the channel count.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli.errors import TeacherError
from dkdm_cli.teachers.diffusers_io import load_component

DIT_CLASS = "DiTTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"  # how the hub's DiT repos (diffusers 0.12) name it
# Transformer2DModel keys that DiTTransformer2DModel does not take, with the value a DiT has; any
# other value means a different model (text cross-attention, VQ-diffusion, PixArt), refused.
_DIT_NEUTRAL = {"cross_attention_dim": None, "num_vector_embeds": None, "only_cross_attention": False,
                "double_self_attention": False, "caption_channels": None,
                "use_additional_conditions": None}
# Keys that never change the DiT path's function (use_linear_projection is the continuous-input
# path's; attention_type "default" is the only kind DiT uses; interpolation_scale checked below).
_DIT_IGNORED = {"use_linear_projection", "attention_type", "interpolation_scale"}


def is_dit_config(config: dict[str, Any]) -> bool:
    """Whether a transformer/config.json describes a DiT (either class name)."""
    kind = config.get("_class_name", LEGACY_CLASS)
    if kind == DIT_CLASS:
        return True
    return kind == LEGACY_CLASS and config.get("norm_type") == "ada_norm_zero" \
        and config.get("patch_size") is not None


def _dit_class() -> type:
    """DiTTransformer2DModel (diffusers >= 0.28), else Transformer2DModel, which then still
    built DiTs itself."""
    import diffusers

    return getattr(diffusers, DIT_CLASS, None) or diffusers.Transformer2DModel


def dit_config(config: dict[str, Any], *, source: str) -> dict[str, Any]:
    """The config diffusers' DiT class is built from, after checking it is a DiT (TeacherError
    naming the problem otherwise). Transformer2DModel's extra keys must have DiT's values."""
    kind = config.get("_class_name", LEGACY_CLASS)
    if kind not in (DIT_CLASS, LEGACY_CLASS):
        raise TeacherError(f"{source}: {kind} is not supported; dkdm distills UNet2DModel and DiT "
                           "(DiTTransformer2DModel) teachers")
    if not is_dit_config(config):
        raise TeacherError(
            f"{source}: this Transformer2DModel is not a DiT (needs patch_size and norm_type "
            f"'ada_norm_zero', has {config.get('patch_size')!r} and {config.get('norm_type')!r}); "
            "text-conditioned or PixArt-style transformers are not supported"
        )
    for key, value in _DIT_NEUTRAL.items():
        if config.get(key) not in (None, value):
            raise TeacherError(f"{source}: {key}={config[key]!r} is not a class-conditional DiT "
                               f"(DiT has {value!r})")
    if config.get("interpolation_scale") not in (None, 1, 1.0):
        raise TeacherError(f"{source}: interpolation_scale {config['interpolation_scale']!r} is not "
                           "supported (DiT's position table has none)")
    if not config.get("num_embeds_ada_norm"):
        raise TeacherError(f"{source}: a DiT needs num_embeds_ada_norm (its number of classes)")
    cls = _dit_class()
    if cls.__name__ != DIT_CLASS:  # an older diffusers: Transformer2DModel takes every key
        return dict(config)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in accepted
                     and k not in _DIT_NEUTRAL and k not in _DIT_IGNORED)
    if unknown:
        raise TeacherError(f"{source}: unknown DiT config keys {', '.join(unknown)}")
    return {k: v for k, v in config.items() if k.startswith("_") or k in accepted}


def dit_shapes(config: dict[str, Any], *, source: str) -> tuple[int, int, int]:
    """(in_channels, out_channels, sample_size) of a DiT config, checked."""
    in_ch = int(config.get("in_channels") or 4)
    out_ch = int(config.get("out_channels") or in_ch)
    size = config.get("sample_size")
    patch = int(config.get("patch_size") or 0)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise TeacherError(f"{source}: non-square sample_size {tuple(size)} is not supported")
        size = size[0]
    if not size or not patch or int(size) % patch:
        raise TeacherError(f"{source}: sample_size {size!r} is not a multiple of patch_size {patch}")
    if out_ch not in (in_ch, 2 * in_ch):
        raise TeacherError(f"{source}: {out_ch} output channels for {in_ch} input channels")
    return in_ch, out_ch, int(size)


class DiffusersDiT(nn.Module):
    """A diffusers DiT behind dkdm's conditional model contract: forward(x, t, y) -> output.

    `num_classes` and `null_class` are read from the module's label table (see the module
    docstring): 1000 and 1000 for the ImageNet DiTs.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        table = label_embedder(transformer)
        self.num_classes = int(table.num_classes)
        rows = int(table.embedding_table.num_embeddings)
        if rows not in (self.num_classes, self.num_classes + 1):
            raise TeacherError(f"DiT label table has {rows} rows for {self.num_classes} classes")
        self.null_class: int | None = self.num_classes if rows == self.num_classes + 1 else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) latents, t (B,) timesteps 0..T-1, y (B,) labels -> (B, C or 2C, h, w)."""
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


def label_embedder(transformer: nn.Module) -> nn.Module:
    """The first block's LabelEmbedding (every block has its own copy of the same table)."""
    try:
        return transformer.transformer_blocks[0].norm1.emb.class_embedder
    except (AttributeError, IndexError) as exc:
        raise TeacherError(f"{type(transformer).__name__} has no DiT label embedding "
                           "(transformer_blocks[0].norm1.emb.class_embedder)") from exc


def load_dit(component: Path, config: dict[str, Any]) -> DiffusersDiT:
    """The DiT in `component` (a transformer/ folder) with its weights, strictly."""
    built = dit_config(config, source=str(component))
    return DiffusersDiT(load_component(_dit_class(), component, config=built))
