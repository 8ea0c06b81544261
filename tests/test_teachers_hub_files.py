"""The registered hub teachers against their real config files (tests/fixtures/hub/, provenance in
its README): the architecture each config builds (on the meta device: nothing is downloaded or
allocated), every key our loader must map, and the schedule, variance, prediction, clipping and
decode scale the original pipelines use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dkdm_cli.teachers.autoencoders import latent_scale
from dkdm_cli.teachers.diffusers_folder import plan_folder
from dkdm_cli.teachers.diffusers_io import LEGACY_ATTENTION, build_on_meta, rename_legacy_keys
from dkdm_cli.teachers.registry import TEACHERS

pytestmark = pytest.mark.usefixtures("no_network")

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
LDM = FIXTURES / "CompVis--ldm-celebahq-256"
CIFAR = FIXTURES / "google--ddpm-cifar10-32"
CELEBA = FIXTURES / "google--ddpm-ema-celebahq-256"
UNET_CONFIGS = {"ldm-celebahq": LDM / "unet" / "config.json", "ddpm-cifar10": CIFAR / "config.json",
                "ddpm-celebahq": CELEBA / "config.resaved.json"}


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _as_saved_in_2022(state: dict) -> dict:
    """The same tensors under the attention names diffusers used before 0.14 (to_q -> query...)."""
    old = {new: legacy for legacy, new in LEGACY_ATTENTION.items()}
    out = {}
    for key, value in state.items():
        for new, legacy in old.items():
            key = key.replace(f".{new}.", f".{legacy}.")
        out[key] = value
    return out


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_config_builds_the_registered_architecture(name):
    from diffusers import UNet2DModel

    from dkdm_cli.models.io import load_state_strict

    config = _config(UNET_CONFIGS[name])
    model = build_on_meta(UNet2DModel, config, source=name)
    assert all(p.is_meta for p in model.parameters())
    entry = TEACHERS.create(name)
    assert sum(p.numel() for p in model.parameters()) == entry.parameters
    assert (model.config.sample_size, model.config.in_channels) == (entry.image_size, entry.channels)
    # Every key and shape maps, whether the file uses today's names or 2022's.
    own = model.state_dict()
    for state in (dict(own), _as_saved_in_2022(own)):
        mapped = rename_legacy_keys(state, set(own))
        load_state_strict(model, mapped, source=name, assign=True)
    assert any(".query." in k for k in _as_saved_in_2022(own))  # every one has attention


def test_ldm_celebahq_vqvae_config_has_no_scale_so_latents_decode_at_one():
    from diffusers import VQModel

    raw = _config(LDM / "vqvae" / "config.json")
    assert "scaling_factor" not in raw
    vq = build_on_meta(VQModel, raw, source="vqvae")
    assert vq.config.scaling_factor == pytest.approx(0.18215)  # diffusers' fill-in: wrong here
    scale = latent_scale("VQModel", raw)
    assert scale.scaling_factor == 1.0 and scale.source == "vqmodel-default"
    entry = TEACHERS.create("ldm-celebahq")
    assert entry.decode_scale == 1.0 and entry.latent and entry.revision == "refs/pr/7"
    # 256x256 images <-> 64x64x3 latents: the UNet's sample size is the VQ's input / 4.
    assert raw["sample_size"] // 2 ** (len(raw["block_out_channels"]) - 1) == entry.image_size
    assert raw["latent_channels"] == entry.channels


def _ldm_folder(tmp_path) -> Path:
    """The fixture laid out as a snapshot (the scheduler file is the partial one, see README)."""
    folder = tmp_path / "ldm"
    shutil.copytree(LDM, folder)
    partial = folder / "scheduler" / "scheduler_config.partial.json"
    partial.rename(partial.with_name("scheduler_config.json"))
    return folder


def test_ldm_celebahq_schedule_matches_its_pipeline(tmp_path):
    from diffusers import DDIMScheduler

    plan = plan_folder(_ldm_folder(tmp_path))
    s = plan.settings
    assert (s.schedule, s.num_timesteps, s.beta_start, s.beta_end) == ("scaled_linear", 1000, 0.0015, 0.0195)
    assert (s.prediction, s.variance, s.clip_denoised) == ("epsilon", "fixed_small", False)
    assert plan.sample_shape == (3, 64, 64) and plan.autoencoder_dir.name == "vqvae"
    assert plan.latent_scale.scaling_factor == 1.0
    reference = DDIMScheduler.from_config(plan.scheduler)  # LDMPipeline's scheduler
    torch.testing.assert_close(s.build().betas.float(), reference.betas, rtol=1e-6, atol=1e-9)
    assert reference.config.clip_sample is False


def test_ddpm_cifar10_schedule_matches_its_pipeline(tmp_path):
    from diffusers import DDPMScheduler

    shutil.copytree(CIFAR, tmp_path / "cifar")
    plan = plan_folder(tmp_path / "cifar")  # the repo-root layout: config.json + scheduler_config.json
    s = plan.settings
    assert (s.schedule, s.num_timesteps, s.beta_start, s.beta_end) == ("linear", 1000, 0.0001, 0.02)
    assert (s.prediction, s.variance, s.clip_denoised) == ("epsilon", "fixed_large", True)
    assert plan.sample_shape == (3, 32, 32) and plan.autoencoder_dir is None
    reference = DDPMScheduler.from_config(plan.scheduler)
    torch.testing.assert_close(s.build().betas.float(), reference.betas)
    assert reference.config.variance_type == "fixed_large" and reference.config.clip_sample is True


def test_teachers_json_reports_revision_weights_and_decode_scale(capsys):
    from dkdm_cli.cli import run

    assert run(["teachers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    ldm, celeba = rows["ldm-celebahq"], rows["ddpm-celebahq"]
    assert ldm["decode_scale"] == 1.0 and "scaling_factor" in ldm["decode_note"]
    assert ldm["revision"] == "refs/pr/7" and "safetensors" in ldm["weights"]
    assert rows["ddpm-cifar10"]["revision"] == "refs/pr/14"
    assert celeba["revision"] is None and "weights_only=True" in celeba["weights"]
    assert rows["ddpm-cifar10"]["decode_scale"] is None
    # DiT-XL/2 (configs and architecture: tests/test_teachers_dit.py): no pinned revision, since
    # which weight files main has was not verified; the loader takes safetensors, else .bin.
    dit = rows["dit-xl2-256"]
    assert dit["revision"] is None and dit["latent"] and dit["decode_scale"] == 0.18215
    assert "safetensors" in dit["weights"] and "weights_only=True" in dit["weights"]
    assert "0.18215" in dit["decode_note"] and dit["num_classes"] == 1000
