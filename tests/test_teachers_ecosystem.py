"""Teachers from the ecosystem: diffusers folders (pixel and latent), the Hugging Face cache,
the registered public teachers, the Python API and `dkdm distill` from every kind of source.
improved/guided-diffusion state dicts are in test_teachers_adm.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import eco_tiny_unet2d, eco_write_ddpm_folder

from dkdm_cli import api
from dkdm_cli.cli import run
from dkdm_cli.errors import ModelFileError, OfflineError, TeacherError
from dkdm_cli.models._blocks import AttentionBlock
from dkdm_cli.sample import save_npz
from dkdm_cli.teachers import adm
from dkdm_cli.teachers.public import download_once, teachers_cache_dir
from dkdm_cli.teachers.registry import TEACHERS
from dkdm_cli.teachers.spec import classify, resolve_teacher

pytestmark = pytest.mark.usefixtures("no_network")


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


def test_folder_without_diffusers_weights_is_a_clear_error(tmp_path):
    from diffusers import DDPMScheduler

    unet = tmp_path / "m" / "unet"
    eco_tiny_unet2d(out_channels=3).save_pretrained(str(unet))
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "model.pt")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(str(tmp_path / "m" / "scheduler"))
    with pytest.raises(TeacherError, match=r"no diffusion_pytorch_model.safetensors or .*\.bin.*model\.pt"):
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
    assert not entry.is_cached()  # main is cached, but the entry pins its safetensors revision
    hf_offline_cache.add("google/ddpm-cifar10-32", tiny_diffusers_teacher_dir, revision=entry.revision,
                         commit="1" * 40)
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


# -- issue 20: damaged teacher files are one line, and nothing is written --------------------------

LFS_POINTER_TEXT = ("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                    "size 1234567\n")  # what a clone without Git LFS leaves (134 bytes)


def _refused_in_one_line(argv, capsys) -> str:
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_config_json_that_is_not_utf8_is_one_line(tmp_path, tiny_diffusers_teacher_dir, capsys):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_diffusers_teacher_dir, folder)
    (folder / "unet" / "config.json").write_bytes(b'{"sample_size": 8, "name": "\xff\xfe"}')
    err = _refused_in_one_line(["distill", "--teacher", str(folder), "--run-dir",
                                str(tmp_path / "run"), "--quiet"], capsys)
    assert "config.json" in err and "UTF-8" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("reader", ["dkdm-safetensors", "diffusers-safetensors", "diffusers-bin",
                                    "adm-pt", "inception"])
def test_git_lfs_pointers_are_named_in_every_weight_reader(reader, tmp_path, tiny_teacher_file,
                                                          tiny_diffusers_teacher_dir, capsys):
    run_dir = ["--run-dir", str(tmp_path / "run"), "--quiet"]
    if reader == "dkdm-safetensors":
        pointer = tmp_path / "teacher.safetensors"
        argv = ["distill", "--teacher", str(pointer), *run_dir]
    elif reader.startswith("diffusers"):
        shutil.copytree(tiny_diffusers_teacher_dir, tmp_path / "teacher")
        weights = tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
        pointer = weights.with_suffix(".bin") if reader.endswith("bin") else weights
        weights.unlink()
        argv = ["distill", "--teacher", str(tmp_path / "teacher"), *run_dir]
    elif reader == "adm-pt":
        pointer = tmp_path / "teacher.pt"
        argv = ["distill", "--teacher", str(pointer), "--teacher-arch", "iddpm-cifar10", *run_dir]
    else:
        pointer = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
        save_npz(np.zeros((4, 8, 8, 3), dtype=np.uint8), tmp_path / "s.npz")
        argv = ["eval", str(tmp_path / "s.npz"), "--isc", "--inception-weights", str(pointer)]
    pointer.write_text(LFS_POINTER_TEXT)
    err = " ".join(_refused_in_one_line(argv, capsys).split())
    assert "Git LFS pointer" in err and "git lfs pull" in err and pointer.name in err, err
    assert not (tmp_path / "run").exists()
