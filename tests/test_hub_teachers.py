"""Hub teachers as the hub really ships them: the registered repos' real config files (kept in
tests/fixtures/hub, sources in its README), `.bin` weights, the LDM decode scale, latent
clipping, and one offline switch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import eco_tiny_unet2d, eco_tiny_vqmodel

from dkdm_cli.cli import run
from dkdm_cli.errors import ModelFileError, OfflineError
from dkdm_cli.teachers.diffusers_folder import decode_scale, settings_from_scheduler
from dkdm_cli.teachers.spec import TEACHERS, resolve_teacher

HUB = Path(__file__).parent / "fixtures" / "hub"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- the real configs ----------------------------------------------------------------------------

def test_ddpm_cifar10_real_config():
    from diffusers import UNet2DModel

    folder = HUB / "google--ddpm-cifar10-32"
    config = _json(folder / "config.json")
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config)
    entry = TEACHERS.create("ddpm-cifar10")
    assert sum(p.numel() for p in unet.parameters()) == entry.parameters
    assert (entry.image_size, entry.channels, entry.latent) == (32, 3, False)
    s = settings_from_scheduler(_json(folder / "scheduler_config.json"), learn_sigma_output=False)
    assert (s.schedule, s.beta_start, s.beta_end, s.num_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert (s.variance, s.prediction, s.clip_denoised) == ("fixed_large", "epsilon", True)


def test_ldm_celebahq_real_config():
    from diffusers import UNet2DModel, VQModel

    folder = HUB / "CompVis--ldm-celebahq-256"
    raw_vq = _json(folder / "vqvae" / "config.json")
    with torch.device("meta"):
        unet = UNet2DModel.from_config(_json(folder / "unet" / "config.json"))
        vq = VQModel.from_config(raw_vq)
    entry = TEACHERS.create("ldm-celebahq")
    assert sum(p.numel() for p in unet.parameters()) == entry.parameters
    assert (entry.image_size, entry.channels, entry.latent) == (64, 3, True)
    # The file has no scaling_factor; diffusers fills in 0.18215, which would decode garbage.
    assert "scaling_factor" not in raw_vq and vq.config.scaling_factor == pytest.approx(0.18215)
    scale, why = decode_scale(raw_vq, kind="VQModel", filled_in=vq.config.scaling_factor)
    assert scale == 1.0 == entry.decode_scale and "unscaled" in why
    s = settings_from_scheduler(_json(folder / "scheduler" / "scheduler_config.json"),
                                learn_sigma_output=False, latent=True)
    assert (s.schedule, s.beta_start, s.beta_end) == ("scaled_linear", 0.0015, 0.0195)
    assert (s.variance, s.prediction, s.clip_denoised) == ("fixed_small", "epsilon", False)


def test_teachers_json_says_the_decode_scale_and_the_weights(capsys):
    assert run(["teachers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    assert rows["ldm-celebahq"]["decode_scale"] == 1.0
    assert rows["digits"]["decode_scale"] is None
    assert ".bin" in rows["ddpm-cifar10"]["weights"]


# -- local folders laid out like the hub's -------------------------------------------------------

def _ldm_folder(path: Path, *, clip_sample: bool | None) -> Path:
    """unet/ + vqvae/ (its config without scaling_factor) + scheduler/, as CompVis ships them;
    the UNet as a .bin only, as on the hub's main branch."""
    from diffusers import DDIMScheduler

    eco_tiny_unet2d(out_channels=3).save_pretrained(str(path / "unet"), safe_serialization=False)
    eco_tiny_vqmodel().save_pretrained(str(path / "vqvae"))
    cfg = _json(path / "vqvae" / "config.json")
    del cfg["scaling_factor"]
    (path / "vqvae" / "config.json").write_text(json.dumps(cfg))
    DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.0015,
                  beta_end=0.0195).save_pretrained(str(path / "scheduler"))
    sched = _json(path / "scheduler" / "scheduler_config.json")
    sched.pop("clip_sample")
    if clip_sample is not None:
        sched["clip_sample"] = clip_sample
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    return path


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory):
    return _ldm_folder(tmp_path_factory.mktemp("hub") / "ldm", clip_sample=None)


def test_vq_latents_decode_unscaled_and_are_never_clipped(ldm_folder):
    from diffusers import VQModel

    teacher = resolve_teacher(str(ldm_folder))
    assert teacher.autoencoder.scaling_factor == 1.0
    assert teacher.info["decode_scale"] == 1.0
    assert not teacher.settings.clip_denoised  # no clip_sample in the config: latents unclipped
    vq = VQModel.from_pretrained(str(ldm_folder / "vqvae")).eval()
    z = _x((2, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(teacher.decode(z), vq.decode(z).sample.clamp(-1, 1))


def test_an_explicit_clip_sample_on_a_latent_teacher_is_obeyed_with_a_warning(tmp_path, capsys):
    teacher = resolve_teacher(str(_ldm_folder(tmp_path / "ldm", clip_sample=True)))
    assert teacher.settings.clip_denoised
    assert "latent" in capsys.readouterr().err


def test_bin_only_unet_computes_what_diffusers_computes(ldm_folder):
    from diffusers import UNet2DModel

    assert not list((ldm_folder / "unet").glob("*.safetensors"))
    teacher = resolve_teacher(str(ldm_folder))
    theirs = UNet2DModel.from_pretrained(str(ldm_folder / "unet"), use_safetensors=False).eval()
    x, t = _x((2, 3, 8, 8), seed=1), torch.tensor([3, 70])
    with torch.no_grad():
        torch.testing.assert_close(teacher.model(x, t), theirs(x, t).sample)


def test_safetensors_are_preferred_when_both_exist(tmp_path):
    from dkdm_cli.teachers.diffusers_folder import weights_format

    unet = eco_tiny_unet2d(out_channels=3)
    unet.save_pretrained(str(tmp_path / "u"), safe_serialization=False)
    assert weights_format(tmp_path / "u") == (False, None)
    unet.save_pretrained(str(tmp_path / "u"))
    assert weights_format(tmp_path / "u") == (True, None)


def test_a_bin_with_pickled_objects_is_refused_in_one_line(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    folder = _ldm_folder(tmp_path / "ldm", clip_sample=None)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ModelFileError, match="not a plain") as info:
        resolve_teacher(str(folder))
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    assert "owned" not in capsys.readouterr().out


def test_the_hub_path_fetches_bin_weights_only_where_safetensors_are_missing(tmp_path, monkeypatch):
    import huggingface_hub

    from dkdm_cli.teachers import hub

    snapshot = tmp_path / "snap"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (snapshot / "vqvae").mkdir()
    (snapshot / "vqvae" / "config.json").write_text("{}")
    (snapshot / "vqvae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    calls = []

    def fake_snapshot(**kw):
        calls.append(kw)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("DKDM_OFFLINE", "1")
    assert hub.download_snapshot("CompVis/ldm-celebahq-256") == snapshot
    assert calls[0]["local_files_only"] and calls[1]["allow_patterns"] == ["unet/diffusion_pytorch_model.bin"]


# -- one offline switch --------------------------------------------------------------------------

@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "DKDM_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "ON", "On"])
def test_every_spelling_of_offline_stops_every_download(var, value, tmp_path, monkeypatch):
    import huggingface_hub

    from dkdm_cli import _offline
    from dkdm_cli.evaluate import inception
    from dkdm_cli.teachers import hub, public

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(var, value)
    assert _offline.is_offline()
    assert inception.is_offline(timeout=0.01)

    def no_network(*args, **kwargs):
        raise AssertionError("network used while offline")

    monkeypatch.setattr(public.urllib.request, "urlopen", no_network)
    with pytest.raises(OfflineError, match=var):
        public.download_once("https://example.invalid/x.pt", tmp_path / "x.pt")
    seen = []
    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: seen.append(kw["local_files_only"]) or str(tmp_path))
    hub.download_snapshot("google/ddpm-cifar10-32")
    assert seen and all(seen)


@pytest.mark.parametrize("value", ["0", "false", "", "no"])
def test_false_spellings_are_online(value, monkeypatch):
    from dkdm_cli import _offline

    for var in _offline.VARIABLES:
        monkeypatch.setenv(var, value)
    assert not _offline.is_offline()


# -- the whole tool on a latent teacher laid out like the hub's ---------------------------------

@pytest.mark.slow
def test_distill_sample_and_eval_a_latent_teacher(ldm_folder, tmp_path, inception_weights, capsys):
    rd = tmp_path / "run"
    args = ["distill", "--teacher", str(ldm_folder), "--student", "dit-t/2", "--iterations", "4",
            "--batch-size", "4", "--run-dir", str(rd), "--set", "distill.rho=0.1",
            "--set", "distill.grid_every=2", "--set", "distill.grid_num=4",
            "--set", "distill.grid_steps=3", "--set", "student.kwargs={hidden_size=32, depth=1}"]
    assert run(args) == 0
    err = capsys.readouterr().err
    assert "decode as latents / 1" in err
    grids = sorted((rd / "grids").glob("*.png"))
    assert grids
    from PIL import Image

    assert Image.open(grids[-1]).size[0] >= 16 * 2  # decoded 16x16 images, not 8x8 latents
    grid = tmp_path / "g.png"
    assert run(["sample", "--model", str(rd), "--num", "4", "--steps", "3", "--grid", str(grid),
                "--quiet"]) == 0
    assert grid.is_file()
    assert run(["eval", str(rd), "--isc", "--num", "10", "--steps", "3", "--inception-weights",
                str(inception_weights), "--json"]) == 0
    assert "isc" in json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    shutil.rmtree(rd)
