"""improved/guided-diffusion ("ADM") state dicts as teachers.

How the ADM loader is verified to compute ADM's function: `adm_reference_forward` below is an
independent, functional re-implementation of improved/guided-diffusion's UNetModel.forward written
from their unet.py (GroupNorm(32), scale-shift ResBlocks, conv/avg-pool resampling, the legacy
and new-order QKV attention as conv1d + einsum). It runs on a state dict whose keys and shapes
are the hand-written ADM layout (`EXPECTED_TINY_ADM_KEYS`) filled with random numbers; the loaded
teacher must match it to float precision. Nothing in that path uses our UNet or our mapping.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ECO_ADM_FLAGS

from dkdm_cli import api
from dkdm_cli.errors import ModelFileError, TeacherError, UserError
from dkdm_cli.models._blocks import AttentionBlock
from dkdm_cli.teachers import adm
from dkdm_cli.teachers.spec import classify, resolve_teacher

pytestmark = pytest.mark.usefixtures("no_network")


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- improved/guided-diffusion state dicts -------------------------------------------------------
# The tiny config: image_size 8, num_channels 32, num_res_blocks 1, channel_mult (1, 2),
# attention_resolutions "4" (ds 2), num_heads 2, learn_sigma (6 output channels).

def _res(prefix, cin, cout, emb=128):
    """ADM ResBlock keys (use_scale_shift_norm: emb_layers gives 2 * cout)."""
    keys = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
            f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
            f"{prefix}.emb_layers.1.weight": (2 * cout, emb), f"{prefix}.emb_layers.1.bias": (2 * cout,),
            f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
            f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
    if cin != cout:
        keys |= {f"{prefix}.skip_connection.weight": (cout, cin, 1, 1),
                 f"{prefix}.skip_connection.bias": (cout,)}
    return keys


def _attn(prefix, c):
    """ADM AttentionBlock keys: qkv and proj_out are Conv1d(kernel 1)."""
    return {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
            f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
            f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)}


EXPECTED_TINY_ADM_KEYS = {
    "time_embed.0.weight": (128, 32), "time_embed.0.bias": (128,),
    "time_embed.2.weight": (128, 128), "time_embed.2.bias": (128,),
    "input_blocks.0.0.weight": (32, 3, 3, 3), "input_blocks.0.0.bias": (32,),
    **_res("input_blocks.1.0", 32, 32),
    "input_blocks.2.0.op.weight": (32, 32, 3, 3), "input_blocks.2.0.op.bias": (32,),
    **_res("input_blocks.3.0", 32, 64), **_attn("input_blocks.3.1", 64),
    **_res("middle_block.0", 64, 64), **_attn("middle_block.1", 64), **_res("middle_block.2", 64, 64),
    **_res("output_blocks.0.0", 128, 64), **_attn("output_blocks.0.1", 64),
    **_res("output_blocks.1.0", 96, 64), **_attn("output_blocks.1.1", 64),
    "output_blocks.1.2.conv.weight": (64, 64, 3, 3), "output_blocks.1.2.conv.bias": (64,),
    **_res("output_blocks.2.0", 96, 32),
    **_res("output_blocks.3.0", 64, 32),
    "out.0.weight": (32,), "out.0.bias": (32,), "out.2.weight": (6, 32, 3, 3), "out.2.bias": (6,),
}


def _random_state(shapes, seed=0, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * std for k, s in shapes.items()}


# A functional ADM written from improved-diffusion's / guided-diffusion's unet.py and nn.py.

def _gn(sd, p, x):
    return F.group_norm(x.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _ref_res(sd, p, x, emb, *, up=False, down=False):
    h = F.silu(_gn(sd, f"{p}.in_layers.0", x))
    if up:  # Upsample(use_conv=False): nearest x2 on both paths
        h, x = (F.interpolate(v, scale_factor=2, mode="nearest") for v in (h, x))
    if down:  # Downsample(use_conv=False): avg_pool(2) on both paths
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])
    scale, shift = e[..., None, None].chunk(2, dim=1)
    h = F.silu(_gn(sd, f"{p}.out_layers.0", h) * (1 + scale) + shift)
    h = F.conv2d(h, sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _ref_attn(sd, p, x, heads, *, legacy=True):
    b, c, hh, ww = x.shape
    xf = x.reshape(b, c, -1)  # (B, C, T)
    qkv = F.conv1d(_gn(sd, f"{p}.norm", xf), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])  # (B, 3C, T)
    ch = c // heads
    if legacy:  # QKVAttentionLegacy: split heads, then q/k/v
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    else:  # QKVAttention: split q/k/v, then heads
        q, k, v = (z.reshape(b * heads, ch, -1) for z in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
    h = F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (xf + h).reshape(b, c, hh, ww)


def adm_reference_forward(sd, x, t, *, mc, mult, blocks, attention_ds, heads, updown=False, legacy=True,
                          y=None):
    """UNetModel.forward(x, t[, y]) of ADM, from a state dict in ADM's own layout."""
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:  # class_cond: emb = emb + self.label_emb(y)
        emb = emb + sd["label_emb.weight"][y]
    h = F.conv2d(x, sd["input_blocks.0.0.weight"], sd["input_blocks.0.0.bias"], padding=1)
    hs, i, ds = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(blocks):
            h = _ref_res(sd, f"input_blocks.{i}.0", h, emb)
            if ds in attention_ds:
                h = _ref_attn(sd, f"input_blocks.{i}.1", h, heads(h.shape[1]), legacy=legacy)
            hs.append(h)
            i += 1
        if level != len(mult) - 1:
            p = f"input_blocks.{i}.0"
            h = (_ref_res(sd, p, h, emb, down=True) if updown else
                 F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1))
            hs.append(h)
            i, ds = i + 1, ds * 2
    h = _ref_res(sd, "middle_block.0", h, emb)
    h = _ref_attn(sd, "middle_block.1", h, heads(h.shape[1]), legacy=legacy)
    h = _ref_res(sd, "middle_block.2", h, emb)
    i = 0
    for level in reversed(range(len(mult))):
        for j in range(blocks + 1):
            h = _ref_res(sd, f"output_blocks.{i}.0", torch.cat([h, hs.pop()], dim=1), emb)
            k = 1
            if ds in attention_ds:
                h, k = _ref_attn(sd, f"output_blocks.{i}.1", h, heads(h.shape[1]), legacy=legacy), 2
            if level and j == blocks:
                p = f"output_blocks.{i}.{k}"
                if updown:
                    h = _ref_res(sd, p, h, emb, up=True)
                else:
                    h = F.interpolate(h, scale_factor=2, mode="nearest")
                    h = F.conv2d(h, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], padding=1)
                ds //= 2
            i += 1
    h = F.silu(_gn(sd, "out.0", h))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


TINY_REF = dict(mc=32, mult=(1, 2), blocks=1, attention_ds=(2,), heads=lambda c: 2)


def test_our_layout_writes_exactly_the_documented_adm_keys():
    model = adm.build_unet(adm.resolve_flags("improved-diffusion", ECO_ADM_FLAGS))
    state = adm.to_adm_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_TINY_ADM_KEYS
    assert adm.expected_adm_shapes(model) == EXPECTED_TINY_ADM_KEYS
    back = adm.from_adm_state_dict(state, model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_adm_checkpoint_computes_adms_function(tmp_path):
    sd = _random_state(EXPECTED_TINY_ADM_KEYS)
    torch.save(sd, tmp_path / "model.pt")
    teacher = resolve_teacher(str(tmp_path / "model.pt"), arch="improved-diffusion",
                              arch_kwargs=ECO_ADM_FLAGS)
    assert classify(str(tmp_path / "model.pt")) == "adm_checkpoint"
    assert teacher.settings.timestep_scale == pytest.approx(10.0)  # 1000 / diffusion_steps (100)
    x, t = _x((2, 3, 8, 8)), torch.tensor([0, 73])
    expected = adm_reference_forward(sd, x, t.float() * 10.0, **TINY_REF)
    torch.testing.assert_close(teacher.model_output(x, t), expected, atol=2e-5, rtol=1e-4)
    assert not any(p.is_meta for p in teacher.model.parameters())


def test_guided_diffusion_updown_and_head_channels(tmp_path):
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", num_head_channels=16, resblock_updown=True,
                 learn_sigma=True)
    model = adm.build_unet(adm.resolve_flags("guided-diffusion", flags), device="meta")
    sd = _random_state(adm.expected_adm_shapes(model), seed=3)
    torch.save(sd, tmp_path / "g.pt")
    for new_order in (False, True):
        teacher = api.load_teacher(str(tmp_path / "g.pt"), arch="guided-diffusion",
                                   use_new_attention_order=new_order, **flags)
        assert teacher.settings.timestep_scale == 1.0
        x, t = _x((2, 3, 8, 8)), torch.tensor([5, 999])
        expected = adm_reference_forward(sd, x, t, mc=32, mult=(1, 2), blocks=1, attention_ds=(2,),
                                         heads=lambda c: c // 16, updown=True, legacy=not new_order)
        torch.testing.assert_close(teacher.model_output(x, t), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_block_matches_adm_qkv_attention(legacy):
    """Our timm-based AttentionBlock with mapped weights == ADM's conv1d + QKV attention."""
    holder = torch.nn.Sequential(AttentionBlock(64, num_heads=4))
    sd = _random_state(_attn("0", 64), seed=5, std=0.3)
    sd["0.norm.weight"] = 1 + sd["0.norm.weight"]
    holder.load_state_dict(adm.from_adm_state_dict(sd, holder, new_attention_order=not legacy))
    x = _x((2, 64, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(holder[0](x), _ref_attn(sd, "0", x, 4, legacy=legacy),
                                   atol=1e-5, rtol=1e-4)


def test_adm_strict_loading_names_the_problem(tmp_path):
    sd = _random_state(EXPECTED_TINY_ADM_KEYS)

    def load(state):
        torch.save(state, tmp_path / "bad.pt")
        return resolve_teacher(str(tmp_path / "bad.pt"), arch="improved-diffusion", arch_kwargs=ECO_ADM_FLAGS)

    missing = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(ModelFileError, match=r"missing: middle_block\.1\.qkv\.weight"):
        load(missing)
    with pytest.raises(ModelFileError, match=r"unexpected: extra\.weight"):
        load({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ModelFileError, match=r"wrong shape: out\.2\.weight"):
        load({**sd, "out.2.weight": torch.zeros(3, 32, 3, 3)})
    with pytest.raises(ModelFileError, match="class-conditional .it has label_emb.: set class_cond"):
        load({**sd, "label_emb.weight": torch.zeros(1000, 128)})
    with pytest.raises(ModelFileError, match="not a plain state dict"):
        torch.save(torch.nn.Linear(2, 2), tmp_path / "bad.pt")  # a pickled module, not a state dict
        resolve_teacher(str(tmp_path / "bad.pt"), arch="improved-diffusion", arch_kwargs=ECO_ADM_FLAGS)


def test_adm_arch_errors_are_clear(tiny_adm_checkpoint):
    path = str(tiny_adm_checkpoint[0])
    with pytest.raises(TeacherError, match="iddpm-cifar10"):
        resolve_teacher(path)
    with pytest.raises(TeacherError, match="Did you mean 'iddpm-cifar10'"):
        resolve_teacher(path, arch="iddpm-cifar")
    with pytest.raises(TeacherError, match="num_channel \\(did you mean num_channels"):
        resolve_teacher(path, arch_kwargs={"num_channel": 32})
    with pytest.raises(TeacherError, match="expected a bool"):
        resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "learn_sigma": "maybe"})
    with pytest.raises(ModelFileError, match="missing: label_emb.weight.*has no label_emb"):
        resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "class_cond": True})
    with pytest.raises(TeacherError, match="norm groups"):
        resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "num_channels": 24})
    # String values (as from --set) are coerced; lists are accepted for comma lists.
    teacher = resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "num_res_blocks": "1",
                                                 "learn_sigma": "true", "channel_mult": [1, 2]})
    assert teacher.settings.learn_sigma


# -- class-conditional checkpoints (class_cond: ImageNet's 1000 labels, no null label) -----------

EXPECTED_TINY_COND_KEYS = {**EXPECTED_TINY_ADM_KEYS, "label_emb.weight": (1000, 128)}
COND_FLAGS = {**ECO_ADM_FLAGS, "class_cond": True}


def test_class_conditional_layout_adds_only_label_emb():
    model = adm.build_unet(adm.resolve_flags("improved-diffusion", COND_FLAGS))
    state = adm.to_adm_state_dict(model)
    assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_TINY_COND_KEYS
    assert (model.num_classes, model.null_class) == (1000, None)
    torch.testing.assert_close(adm.from_adm_state_dict(state, model)["label_emb.weight"],
                               model.label_emb.weight, rtol=0, atol=0)  # 1:1, no reordering


def test_class_conditional_adm_checkpoint_computes_adms_function(tmp_path):
    sd = _random_state(EXPECTED_TINY_COND_KEYS, seed=11)
    torch.save(sd, tmp_path / "cond.pt")
    teacher = resolve_teacher(str(tmp_path / "cond.pt"), arch="improved-diffusion", arch_kwargs=COND_FLAGS)
    assert teacher.conditional and (teacher.num_classes, teacher.null_class) == (1000, None)
    x, t, y = _x((3, 3, 8, 8)), torch.tensor([0, 41, 99]), torch.tensor([0, 517, 999])
    expected = adm_reference_forward(sd, x, t.float() * 10.0, y=y, **TINY_REF)
    torch.testing.assert_close(teacher.model_output(x, t, y), expected, atol=2e-5, rtol=1e-4)
    other = adm_reference_forward(sd, x, t.float() * 10.0, y=torch.tensor([1, 2, 3]), **TINY_REF)
    assert not torch.allclose(expected, other, atol=1e-3)  # the label matters
    # No null label: labels are required and classifier-free guidance is refused.
    with pytest.raises(UserError, match="no null class"):
        teacher.model_output(x, t)
    with pytest.raises(UserError, match="no null class"):
        teacher.denoise_fn(y, cfg=2.0)
    with pytest.raises(UserError, match="0..999"):
        teacher.check_labels(torch.tensor([1000]))


def test_class_conditional_strict_loading_names_label_emb(tmp_path):
    sd = _random_state(EXPECTED_TINY_COND_KEYS, seed=12)

    def load(state):
        torch.save(state, tmp_path / "bad.pt")
        return resolve_teacher(str(tmp_path / "bad.pt"), arch="improved-diffusion", arch_kwargs=COND_FLAGS)

    with pytest.raises(ModelFileError, match=r"missing: label_emb\.weight.*set class_cond=false"):
        load({k: v for k, v in sd.items() if k != "label_emb.weight"})
    with pytest.raises(ModelFileError, match=r"wrong shape: label_emb\.weight \(10, 128\) != \(1000, 128\)"
                                             r".*1000 labels"):
        load({**sd, "label_emb.weight": torch.zeros(10, 128)})


@pytest.mark.parametrize("name,size,steps,schedule,scale,new_order", [
    ("iddpm-imagenet64-cond", 64, 4000, "cosine", 1.0, False),
    ("adm-64-cond", 64, 1000, "cosine", 1.0, True),
    ("adm-128-cond", 128, 1000, "linear", 1.0, False),
    ("adm-256-cond", 256, 1000, "linear", 1.0, False),
])
def test_class_conditional_presets_match_their_registered_teachers(name, size, steps, schedule, scale,
                                                                   new_order):
    from dkdm_cli.teachers.registry import TEACHERS

    flags = adm.resolve_flags(name)
    assert flags.class_cond and flags.learn_sigma and flags.use_new_attention_order == new_order
    model = adm.build_unet(flags, device="meta")
    entry = TEACHERS.create(name)
    assert sum(p.numel() for p in model.parameters()) == entry.parameters
    assert (entry.image_size, entry.num_classes, entry.null_class) == (size, 1000, None)
    assert model.label_emb.weight.shape == (1000, 4 * flags.num_channels)
    settings = adm.diffusion_settings(flags)
    assert (settings.num_timesteps, settings.schedule, settings.variance, settings.timestep_scale) == \
        (steps, schedule, "learned_range", scale)
    assert entry.source.startswith("https://openaipublic.blob.core.windows.net/diffusion/")
