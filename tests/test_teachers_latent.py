"""Hub-shaped local folders (issue 11): a latent folder whose vqvae/config.json has no
scaling_factor and whose scheduler says nothing about clipping, as CompVis/ldm-celebahq-256 ships,
and `.bin`-only UNet folders, as the google/ddpm-* and CompVis/ldm-* repos ship. Nothing here
touches the network."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_DIT, eco_tiny_unet2d, eco_write_ldm_folder

from dkdm_cli import api
from dkdm_cli.cli import run
from dkdm_cli.errors import ModelFileError
from dkdm_cli.teachers.spec import resolve_teacher

pytestmark = pytest.mark.usefixtures("no_network")


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _drop_key(path, key):
    config = json.loads(path.read_text())
    config.pop(key, None)
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_hub_like_ldm(path):
    """A tiny LDMPipeline folder laid out as the hub's ldm-celebahq-256: no scaling_factor in
    vqvae/config.json (diffusers then assumes 0.18215) and no clip_sample in the scheduler."""
    eco_write_ldm_folder(path)
    _drop_key(path / "vqvae" / "config.json", "scaling_factor")
    _drop_key(path / "scheduler" / "scheduler_config.json", "clip_sample")
    return path


@pytest.fixture(scope="module")
def hub_like_ldm(tmp_path_factory):
    return write_hub_like_ldm(tmp_path_factory.mktemp("hub-like") / "tiny-ldm")


# -- 1. the decode scale -------------------------------------------------------------------------

def test_vq_without_scaling_factor_decodes_like_the_vq_model_itself(hub_like_ldm):
    from diffusers import VQModel

    teacher = resolve_teacher(str(hub_like_ldm))
    vq = VQModel.from_pretrained(str(hub_like_ldm / "vqvae")).eval()
    assert vq.config.scaling_factor == pytest.approx(0.18215)  # what diffusers fills in
    assert teacher.autoencoder.scaling_factor == 1.0
    assert teacher.info["decode_scale"] == 1.0 and teacher.info["decode_scale_source"] == "vqmodel-default"
    z = _x((2, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(teacher.decode(z), vq.decode(z).sample.clamp(-1, 1))
    note = teacher.space_note()
    assert "decode scale 1" in note and "no scaling_factor" in note and "not clipped" in note


def test_explicit_scaling_factor_is_used_for_either_class():
    from dkdm_cli.teachers.autoencoders import KL_DEFAULT_SCALE, latent_scale

    assert latent_scale("VQModel", {"scaling_factor": 1.0}).scaling_factor == 1.0
    assert latent_scale("VQModel", {"scaling_factor": 0.7}).source == "config"
    assert latent_scale("VQModel", {}).scaling_factor == 1.0
    kl = latent_scale("AutoencoderKL", {})
    assert kl.scaling_factor == KL_DEFAULT_SCALE and kl.source == "diffusers-default"
    assert latent_scale("AutoencoderKL", {"scaling_factor": 0.5, "shift_factor": 0.1}).shift_factor == 0.1


def test_distill_banner_says_the_decode_scale(hub_like_ldm, tmp_path, capsys):
    from conftest import tiny_distill_args

    args = tiny_distill_args(hub_like_ldm, tmp_path / "run", iterations=1)
    args.remove("--quiet")
    assert run(args) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "decode scale 1 (config has no scaling_factor" in err and "x0 not clipped" in err


# -- 2. latent clipping --------------------------------------------------------------------------

def test_latent_teacher_without_clip_sample_never_clips(hub_like_ldm):
    teacher = resolve_teacher(str(hub_like_ldm))
    assert teacher.settings.clip_denoised is False
    # A state whose x0 prediction is far outside [-1, 1] keeps it: the reverse mean is unclipped.
    x, t = 6 * _x((1, 3, 8, 8)), torch.tensor([50])
    mean, _ = teacher.reverse_step_distribution(x, t)
    step = teacher.schedule.p_mean_variance(teacher.model_output(x, t), x_t=x, t=t,
                                            clip_denoised=False)
    torch.testing.assert_close(mean, step.mean)


def test_explicit_clip_sample_in_a_latent_folder_warns_and_is_obeyed(hub_like_ldm, tmp_path, capsys):
    folder = tmp_path / "ldm"
    shutil.copytree(hub_like_ldm, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True}))
    assert resolve_teacher(str(folder)).settings.clip_denoised is True
    assert "clip_sample" in capsys.readouterr().err


def test_pixel_folder_without_clip_sample_still_clips(tmp_path):
    from conftest import eco_write_ddpm_folder

    folder = eco_write_ddpm_folder(tmp_path / "p", variance_type="fixed_small")
    _drop_key(folder / "scheduler" / "scheduler_config.json", "clip_sample")
    assert resolve_teacher(str(folder)).settings.clip_denoised is True


# -- 3. `.bin` weights ---------------------------------------------------------------------------

def _bin_folder(path, *, legacy_names=False):
    """A DDPM folder whose UNet ships only diffusion_pytorch_model.bin (as google/ddpm-* do)."""
    from diffusers import DDPMScheduler

    unet = eco_tiny_unet2d(out_channels=3)
    unet.save_pretrained(str(path / "unet"), safe_serialization=False)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(path / "scheduler"))
    if legacy_names:  # diffusers < 0.14 attention names, as 2022 hub uploads have
        names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        state = torch.load(path / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
        renamed = {}
        for key, value in state.items():
            for new, old in names.items():
                key = key.replace(f".{new}.", f".{old}.")
            renamed[key] = value
        assert renamed.keys() != state.keys()
        torch.save(renamed, path / "unet" / "diffusion_pytorch_model.bin")
    return path, unet


@pytest.mark.parametrize("legacy_names", [False, True])
def test_bin_only_folder_computes_what_diffusers_computes(tmp_path, legacy_names):
    from diffusers import UNet2DModel

    folder, unet = _bin_folder(tmp_path / "m", legacy_names=legacy_names)
    assert not list(folder.rglob("*.safetensors"))
    teacher = resolve_teacher(str(folder))
    assert teacher.info["weights"] == ["diffusion_pytorch_model.bin"]
    reference = UNet2DModel.from_pretrained(str(folder / "unet")).eval()  # diffusers' own loader
    x, t = _x((2, 3, 8, 8)), torch.tensor([3, 77])
    with torch.no_grad():
        expected = reference(x, t).sample
        torch.testing.assert_close(expected, unet(x, t).sample)
    torch.testing.assert_close(teacher.model_output(x, t), expected, atol=1e-5, rtol=1e-5)


def test_safetensors_preferred_when_both_exist(tmp_path, monkeypatch):
    folder, unet = _bin_folder(tmp_path / "m")
    unet.save_pretrained(str(folder / "unet"))  # adds diffusion_pytorch_model.safetensors

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load used although safetensors exist")

    monkeypatch.setattr(torch, "load", no_pickle)
    assert resolve_teacher(str(folder)).info["weights"] == ["diffusion_pytorch_model.safetensors"]


def test_bin_that_is_not_a_tensor_dict_is_refused_in_one_line(tmp_path):
    import argparse

    folder, _ = _bin_folder(tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    # A pickle that needs a non-tensor global (what an exploit or a full-module save looks like).
    torch.save({"model": argparse.Namespace(a=1)}, weights)
    with pytest.raises(ModelFileError) as info:
        resolve_teacher(str(folder))
    message = str(info.value)
    assert "\n" not in message and "weights_only=True" in message
    assert "weights_only=False" not in message
    torch.save({"epoch": 3, "w": torch.zeros(2)}, weights)  # loads, but is not a tensor dict
    with pytest.raises(ModelFileError, match="not a plain tensor state dict"):
        resolve_teacher(str(folder))


def test_missing_or_mis_shaped_keys_are_named(tmp_path):
    folder, _ = _bin_folder(tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(weights, weights_only=True)
    state.pop("conv_in.weight")
    state["conv_out.bias"] = torch.zeros(5)
    torch.save(state, weights)
    with pytest.raises(ModelFileError, match=r"missing: conv_in\.weight.*wrong shape: conv_out\.bias"):
        resolve_teacher(str(folder))


# -- the whole path: distill, grids, sample, eval -------------------------------------------------

@pytest.mark.slow
def test_distill_sample_and_eval_on_a_hub_like_latent_folder(hub_like_ldm, tmp_path, capsys):
    import numpy as np
    from conftest import make_inception_weights, tiny_distill_args
    from PIL import Image

    from dkdm_cli.config import EvalConfig
    from dkdm_cli.evaluate import evaluate
    from dkdm_cli.evaluate import metrics as M

    run_dir = tmp_path / "run"
    args = tiny_distill_args(hub_like_ldm, run_dir, iterations=2)
    args[args.index("unet-t")] = "dit-t/2"
    args += ["--set", "student.kwargs=" + "{" + ", ".join(f"{k}={v}" for k, v in TINY_DIT.items()) + "}",
             "--set", "distill.grid_every=2", "--set", "distill.grid_num=4", "--set", "distill.grid_steps=2"]
    assert run(args) == 0
    grids = sorted((run_dir / "grids").glob("*.png"))
    assert grids and Image.open(grids[-1]).size[0] >= 16  # decoded: 16x16 images, not 8x8 latents
    student = api.load_student(run_dir)
    assert student.autoencoder is not None and student.autoencoder.scaling_factor == 1.0
    assert student.settings.clip_denoised is False

    npz = tmp_path / "s.npz"
    assert run(["sample", "--model", str(run_dir), "--num", "3", "--steps", "2", "--device", "cpu",
                "--npz", str(npz), "--quiet"]) == 0
    with np.load(npz) as f:
        assert f["arr_0"].shape == (3, 16, 16, 3)

    weights = make_inception_weights(tmp_path / "inception.pth")
    cfg = EvalConfig(reference="teacher", inception_weights=str(weights), device="cpu",
                     batch_size=8, num=4, steps=2, allow_unknown_inception=True)
    result = evaluate(str(run_dir), cfg=cfg, metrics={"fid"},
                      settings=M.MetricSettings(fid_layer="64", isc_splits=2, kid_subsets=4))
    assert np.isfinite(result.values["fid"])
