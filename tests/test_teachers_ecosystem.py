"""Teachers from the ecosystem: diffusers folders (pixel and latent), the Hugging Face cache,
improved/guided-diffusion state dicts, the registered public teachers and the Python API.

How the ADM loader is verified to compute ADM's function: `adm_reference_forward` below is an
independent, functional re-implementation of improved/guided-diffusion's UNetModel.forward written
from their unet.py (GroupNorm(32), scale-shift ResBlocks, conv/avg-pool resampling, the legacy
and new-order QKV attention as conv1d + einsum). It runs on a state dict whose keys and shapes
are the hand-written ADM layout (`EXPECTED_TINY_ADM_KEYS`) filled with random numbers; the loaded
teacher must match it to float precision. Nothing in that path uses our UNet or our mapping.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ECO_ADM_FLAGS, eco_tiny_unet2d, eco_write_ddpm_folder

from dkdm_cli import api
from dkdm_cli.cli import run
from dkdm_cli.errors import ModelFileError, OfflineError, TeacherError
from dkdm_cli.models._blocks import AttentionBlock
from dkdm_cli.teachers import adm
from dkdm_cli.teachers.public import download_once, teachers_cache_dir
from dkdm_cli.teachers.registry import TEACHERS
from dkdm_cli.teachers.spec import classify, resolve_teacher


@pytest.fixture(autouse=True)
def _forbid_network(monkeypatch):
    """Any attempt to open a socket fails loudly: these tests are offline by construction."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- diffusers folders -----------------------------------------------------------------------

def _compare_with_ddpm_scheduler(teacher, unet, scheduler, *, steps, shape=(2, 3, 8, 8)):
    """The teacher's output == diffusers' forward, and its reverse step == DDPMScheduler.step
    with the same model output and the same noise, at each of `steps`."""
    x = _x(shape)
    for step in steps:
        t = torch.full((shape[0],), step, dtype=torch.long)
        out = teacher.model_output(x, t)
        with torch.no_grad():
            ref = unet(x, t).sample
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        mean, log_var = teacher.reverse_step_distribution(x, t)
        ddpm = scheduler.step(ref, step, x, generator=torch.Generator().manual_seed(7))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        ours = mean + (step > 0) * torch.exp(0.5 * log_var) * noise
        torch.testing.assert_close(ours, ddpm.prev_sample, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variance,prediction,schedule", [
    ("learned_range", "epsilon", "squaredcos_cap_v2"),
    ("fixed_small", "epsilon", "linear"),
    ("fixed_small", "v_prediction", "scaled_linear"),
    ("fixed_large", "sample", "linear"),
])
def test_diffusers_folder_matches_diffusers(tmp_path, monkeypatch, variance, prediction, schedule):
    from diffusers import DDPMScheduler, UNet2DModel

    folder = eco_write_ddpm_folder(tmp_path / "p", variance_type=variance,
                                   prediction_type=prediction, beta_schedule=schedule)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load (pickle) used on a diffusers folder")

    monkeypatch.setattr(torch, "load", no_pickle)
    teacher = resolve_teacher(str(folder))
    assert classify(str(folder)) == "diffusers_dir"
    assert teacher.sample_shape == (3, 8, 8) and teacher.autoencoder is None
    assert teacher.settings.prediction == prediction and teacher.settings.variance == variance
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    torch.testing.assert_close(teacher.schedule.betas.float(), scheduler.betas, atol=1e-6, rtol=1e-5)
    unet = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    _compare_with_ddpm_scheduler(teacher, unet, scheduler, steps=(0, 1, 37, 99))


def test_trained_betas_become_an_explicit_schedule(tmp_path):
    betas = torch.linspace(1e-4, 0.05, 100).tolist()
    folder = eco_write_ddpm_folder(tmp_path / "p", variance_type="fixed_small", trained_betas=betas)
    teacher = resolve_teacher(str(folder))
    assert teacher.settings.schedule == "explicit"
    torch.testing.assert_close(teacher.schedule.betas, torch.tensor(betas, dtype=torch.float64))


def test_bare_unet_folder_with_root_scheduler_config(tmp_path):
    from diffusers import DDPMScheduler

    unet = eco_tiny_unet2d(out_channels=3)
    unet.save_pretrained(str(tmp_path / "m"))
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(tmp_path / "m"))
    teacher = resolve_teacher(str(tmp_path / "m"))
    assert teacher.settings.variance == "fixed_small" and teacher.settings.num_timesteps == 100


def test_pickle_only_weights_are_refused(tmp_path):
    from diffusers import DDPMScheduler

    eco_tiny_unet2d(out_channels=3).save_pretrained(str(tmp_path / "m" / "unet"), safe_serialization=False)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(tmp_path / "m" / "scheduler"))
    with pytest.raises(TeacherError, match="only pickled weights.*safetensors"):
        resolve_teacher(str(tmp_path / "m"))


def test_missing_scheduler_is_a_clear_error(tmp_path):
    eco_tiny_unet2d(out_channels=3).save_pretrained(str(tmp_path / "m" / "unet"))
    with pytest.raises(TeacherError, match="no scheduler config"):
        resolve_teacher(str(tmp_path / "m"))


def test_latent_folder_has_latent_shape_and_decodes_like_ldm(tiny_latent_teacher_dir):
    from diffusers import DDPMScheduler, UNet2DModel, VQModel

    teacher = resolve_teacher(str(tiny_latent_teacher_dir))
    assert teacher.sample_shape == (3, 8, 8)
    assert teacher.settings.schedule == "scaled_linear" and not teacher.settings.clip_denoised
    ae = teacher.autoencoder
    assert ae is not None and ae.scaling_factor == pytest.approx(0.7)
    vq = VQModel.from_pretrained(str(tiny_latent_teacher_dir / "vqvae")).eval()
    z = _x((2, 3, 8, 8))
    with torch.no_grad():
        expected = vq.decode(z / 0.7).sample.clamp(-1, 1)  # what LDMPipeline does
        torch.testing.assert_close(teacher.decode(z), expected)
        images = _x((2, 3, 16, 16)).clamp(-1, 1)
        torch.testing.assert_close(ae.encode(images), vq.encode(images).latents * 0.7)
    # The same DDIM training config drives DDPMScheduler.step exactly like our reverse step.
    scheduler = DDPMScheduler.from_pretrained(str(tiny_latent_teacher_dir / "scheduler"))
    unet = UNet2DModel.from_pretrained(str(tiny_latent_teacher_dir / "unet")).eval()
    _compare_with_ddpm_scheduler(teacher, unet, scheduler, steps=(0, 5, 99))


def test_autoencoder_kl_under_vae(tmp_path, tiny_diffusers_teacher_dir):
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path / "kl"
    shutil.copytree(tiny_diffusers_teacher_dir, folder)
    vae = AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=3,
                        layers_per_block=1, scaling_factor=0.5, shift_factor=0.1).eval()
    vae.save_pretrained(str(folder / "vae"))
    teacher = resolve_teacher(str(folder))
    z = _x((1, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(teacher.decode(z), vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1))


# -- the Hugging Face hub cache ----------------------------------------------------------------

def test_hub_spec_loads_from_the_offline_cache(hf_offline_cache, tiny_diffusers_teacher_dir):
    from dkdm_cli.teachers.hub import is_hub_cached

    assert not is_hub_cached("dkdm-test/tiny-ddpm")
    snapshot = hf_offline_cache.add("dkdm-test/tiny-ddpm", tiny_diffusers_teacher_dir)
    assert is_hub_cached("dkdm-test/tiny-ddpm")
    teacher = resolve_teacher("hf:dkdm-test/tiny-ddpm")
    assert teacher.name == "tiny-ddpm" and teacher.source == "hf:dkdm-test/tiny-ddpm"
    pinned = resolve_teacher(f"hf:dkdm-test/tiny-ddpm@{snapshot.name}")
    x, t = _x((1, 3, 8, 8)), torch.tensor([3])
    torch.testing.assert_close(teacher.model_output(x, t), pinned.model_output(x, t))


def test_missing_hub_repo_offline_fails_fast_and_says_where(hf_offline_cache):
    start = time.monotonic()
    with pytest.raises(OfflineError) as info:
        resolve_teacher("hf:dkdm-test/not-there@v1")
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "hf:dkdm-test/not-there@v1" in message and str(hf_offline_cache.dir) in message
    assert "models--dkdm-test--not-there" in message and "./folder" in message


def test_connection_error_falls_back_to_the_cache(hf_offline_cache, tiny_diffusers_teacher_dir,
                                                  monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def unreachable(self, *args, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    hf_offline_cache.add("dkdm-test/tiny-ddpm", tiny_diffusers_teacher_dir)
    assert resolve_teacher("hf:dkdm-test/tiny-ddpm").sample_shape == (3, 8, 8)
    assert calls and calls[0] is not None  # the reachability check has a timeout
    with pytest.raises(OfflineError, match="cannot be reached"):
        resolve_teacher("hf:dkdm-test/absent")


@pytest.mark.parametrize("spec", ["hf:noslash", "hf:a/b@", "hf:../x"])
def test_malformed_hub_specs(spec, hf_offline_cache):
    with pytest.raises(TeacherError, match="expected hf:ORG/NAME"):
        resolve_teacher(spec)


def test_ambiguous_spec_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError) as info:
        resolve_teacher("google/ddpm-cifar10-32")
    assert "hf:google/ddpm-cifar10-32" in str(info.value) and "./google/ddpm-cifar10-32" in str(info.value)


# -- registered public teachers ------------------------------------------------------------------

PUBLIC = {"ddpm-cifar10": "hf:google/ddpm-cifar10-32", "ddpm-celebahq": "hf:google/ddpm-ema-celebahq-256",
          "ldm-celebahq": "hf:CompVis/ldm-celebahq-256"}


def test_public_teachers_are_registered_and_listed(hf_offline_cache, dkdm_cache_in_tmp, capsys):
    for name, source in PUBLIC.items():
        assert TEACHERS.create(name).source == source
    assert TEACHERS.create("iddpm-cifar10").source.endswith("/cifar10_uncond_50M_500K.pt")
    assert run(["teachers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    for name in [*PUBLIC, "iddpm-cifar10"]:
        row = rows[name]
        assert row["cached"] is False and row["parameters"] and row["image_size"] and row["channels"] == 3
    assert rows["ldm-celebahq"]["latent"] and rows["ldm-celebahq"]["image_size"] == 64


def test_registered_hub_teacher_loads_from_cache(hf_offline_cache, tiny_diffusers_teacher_dir):
    entry = TEACHERS.create("ddpm-cifar10")
    assert not entry.is_cached()
    with pytest.raises(OfflineError, match="google/ddpm-cifar10-32"):
        resolve_teacher("ddpm-cifar10")
    hf_offline_cache.add("google/ddpm-cifar10-32", tiny_diffusers_teacher_dir)
    assert entry.is_cached()
    assert resolve_teacher("ddpm-cifar10").name == "ddpm-cifar10"


def test_iddpm_preset_matches_the_registered_parameter_count():
    model = adm.build_unet(adm.resolve_flags("iddpm-cifar10"), device="meta")
    assert sum(p.numel() for p in model.parameters()) == TEACHERS.create("iddpm-cifar10").parameters
    settings = adm.diffusion_settings(adm.resolve_flags("iddpm-cifar10"))
    assert (settings.num_timesteps, settings.schedule, settings.variance) == (4000, "cosine", "learned_range")
    assert settings.timestep_scale == 0.25
    big = adm.build_unet(adm.resolve_flags("adm-256-uncond"), device="meta")
    blocks = [m for m in big.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(m.attn.num_heads * 64 == m.norm.num_channels for m in blocks)
    assert adm.diffusion_settings(adm.resolve_flags("adm-256-uncond")).timestep_scale == 1.0


def test_direct_download_is_cached_and_hash_checked(tmp_path, dkdm_cache_in_tmp, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # it also disables direct downloads
    monkeypatch.delenv("DKDM_OFFLINE", raising=False)
    src = tmp_path / "remote.pt"
    src.write_bytes(b"weights" * 1000)
    entry = TEACHERS.create("iddpm-cifar10")
    assert not entry.is_cached()
    dest = teachers_cache_dir() / "cifar10_uncond_50M_500K.pt"
    assert str(dest).startswith(str(dkdm_cache_in_tmp))
    assert download_once(src.as_uri(), dest) == dest
    assert dest.read_bytes() == src.read_bytes() and entry.is_cached()
    sidecar = dest.parent / (dest.name + ".sha256")
    assert sidecar.read_text().split()[0] == hashlib.sha256(src.read_bytes()).hexdigest()
    src.unlink()
    download_once(src.as_uri(), dest)  # cached: no download attempted
    dest.write_bytes(b"truncated")
    with pytest.raises(ModelFileError, match="sha256"):
        download_once(src.as_uri(), dest)
    with pytest.raises(ModelFileError, match="sha256"):  # a published hash wins over the sidecar
        download_once(src.as_uri(), dest, sha256="0" * 64)
    with pytest.raises(OfflineError, match="put the file at"):
        download_once(src.as_uri(), tmp_path / "new" / "missing.pt")
    monkeypatch.setenv("DKDM_OFFLINE", "1")
    with pytest.raises(OfflineError, match="offline"):
        download_once(src.as_uri(), tmp_path / "new" / "missing.pt")


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


def adm_reference_forward(sd, x, t, *, mc, mult, blocks, attention_ds, heads, updown=False, legacy=True):
    """UNetModel.forward(x, t) of ADM, from a state dict in ADM's own layout."""
    half = mc // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
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
    with pytest.raises(ModelFileError, match="class-conditional"):
        load({**sd, "label_emb.weight": torch.zeros(1000, 128)})
    with pytest.raises(ModelFileError, match="not a loadable tensor state dict"):
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
    with pytest.raises(TeacherError, match="class-conditional"):
        resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "class_cond": True})
    with pytest.raises(TeacherError, match="norm groups"):
        resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "num_channels": 24})
    # String values (as from --set) are coerced; lists are accepted for comma lists.
    teacher = resolve_teacher(path, arch_kwargs={**ECO_ADM_FLAGS, "num_res_blocks": "1",
                                                 "learn_sigma": "true", "channel_mult": [1, 2]})
    assert teacher.settings.learn_sigma


# -- the Python API --------------------------------------------------------------------------------

def test_api_load_teacher_and_student(tmp_path, tiny_diffusers_teacher_dir, tiny_adm_checkpoint):
    from dkdm_cli.diffusion.settings import DiffusionSettings
    from dkdm_cli.models import create_model
    from dkdm_cli.models.io import save_model

    teacher = api.load_teacher(str(tiny_diffusers_teacher_dir))
    x, t = _x((2, 3, 8, 8)), torch.tensor([1, 50])
    mean, log_var = teacher.reverse_step_distribution(x, t)
    assert mean.shape == x.shape and log_var.shape == x.shape
    assert teacher.schedule.num_timesteps == 100 and teacher.sample_shape == (3, 8, 8)
    path, arch, flags = tiny_adm_checkpoint
    assert api.load_teacher(path, arch=arch, **flags).model_output(x, t).shape == (2, 6, 8, 8)

    student = create_model("unet-t", image_size=8, in_channels=3, learn_sigma=True)
    save_model(student, tmp_path / "s.safetensors", extra={"diffusion": DiffusionSettings().to_dict()})
    loaded = api.load_student(tmp_path / "s.safetensors")
    assert loaded.model_output(x, t).shape == (2, 6, 8, 8)
    with pytest.raises(TeacherError, match="not a dkdm run directory"):
        api.load_student(tiny_diffusers_teacher_dir)
    with pytest.raises(TeacherError, match="no such"):
        api.load_student(tmp_path / "nothing")


# -- `dkdm distill` from every kind of source ----------------------------------------------------

ADM_DISTILL_FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1",
                         attention_resolutions="8", num_heads=1, learn_sigma=True, diffusion_steps=100,
                         noise_schedule="cosine")


def _toml_inline(d):
    def value(v):
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    return "{" + ", ".join(f"{k} = {value(v)}" for k, v in d.items()) + "}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["diffusers", "hub", "adm", "latent"])
def test_distill_runs_from_each_kind_of_source(kind, tmp_path, hf_offline_cache, tiny_diffusers_teacher_dir,
                                               tiny_latent_teacher_dir):
    from conftest import eco_write_adm_checkpoint, tiny_distill_args

    extra: list[str] = []
    if kind == "diffusers":
        spec = str(tiny_diffusers_teacher_dir)
    elif kind == "hub":
        hf_offline_cache.add("dkdm-test/tiny-ddpm", tiny_diffusers_teacher_dir)
        spec = "hf:dkdm-test/tiny-ddpm"
    elif kind == "latent":
        spec = str(tiny_latent_teacher_dir)
    else:
        spec = str(eco_write_adm_checkpoint(tmp_path / "teacher.pt", flags=ADM_DISTILL_FLAGS))
        extra = ["--set", "teacher.arch=improved-diffusion",
                 "--set", f"teacher.arch_kwargs={_toml_inline(ADM_DISTILL_FLAGS)}"]
    run_dir = tmp_path / "run"
    assert run(tiny_distill_args(spec, run_dir, iterations=3, extra=extra)) == 0
    student = api.load_student(run_dir)
    assert student.sample_shape == (3, 8, 8)
    assert (student.autoencoder is not None) == (kind == "latent")
    out = student.model_output(_x((2, 3, 8, 8)), torch.tensor([0, 99]))
    assert out.shape[:1] == (2,) and torch.isfinite(out).all()
