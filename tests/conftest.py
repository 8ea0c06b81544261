"""Shared fixtures: tiny teachers built on the fly (nothing is downloaded), a temp home."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.models import create_model
from dkdm_cli.models.io import save_model

TINY_UNET = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                 num_heads=1)


def make_tiny_teacher_file(path: Path, *, learn_sigma: bool = True, num_timesteps: int = 20,
                           image_size: int = 8, channels: int = 1, seed: int = 0,
                           variance: str | None = None, num_classes: int = 0,
                           class_null: bool = False) -> Path:
    """A dkdm model file holding a tiny random UNet teacher with a short noise schedule
    (class-conditional with `num_classes`, with a null class when `class_null`).

    Its zero-initialised output layer is randomised so the teacher's eps is not trivially 0.
    """
    torch.manual_seed(seed)
    labels = dict(num_classes=num_classes, class_null=class_null) if num_classes else {}
    model = create_model("unet-t", image_size=image_size, in_channels=channels,
                         learn_sigma=learn_sigma, **TINY_UNET, **labels)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    settings = DiffusionSettings(
        schedule="cosine", num_timesteps=num_timesteps,
        variance=variance or ("learned_range" if learn_sigma else "fixed_small"),
    )
    save_model(model, path, extra={"diffusion": settings.to_dict()})
    return path


@pytest.fixture(scope="session")
def tiny_teacher_file(tmp_path_factory) -> Path:
    """A tiny learned-variance teacher (T = 20, 8x8x1) as a dkdm model file."""
    return make_tiny_teacher_file(tmp_path_factory.mktemp("teachers") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_cond_teacher_file(tmp_path_factory) -> Path:
    """A tiny class-conditional teacher: 3 classes and a null class (index 3), T = 20, 8x8x1."""
    return make_tiny_teacher_file(tmp_path_factory.mktemp("teachers") / "tiny_cond.safetensors",
                                  num_classes=3, class_null=True)


@pytest.fixture(scope="session")
def tiny_fixed_teacher_file(tmp_path_factory) -> Path:
    """A tiny fixed-variance teacher (T = 20, 8x8x1) as a dkdm model file."""
    return make_tiny_teacher_file(tmp_path_factory.mktemp("teachers") / "tiny_fixed.safetensors",
                                  learn_sigma=False)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own home/cache dirs and no network for the hub."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("DKDM_DEBUG", raising=False)
    torch.set_num_threads(1)


def tiny_distill_args(teacher: Path, run_dir: Path, *, iterations: int = 6, batch: int = 4,
                      extra: list[str] | None = None) -> list[str]:
    """`dkdm distill` arguments for a few-second run on a tiny teacher."""
    return [
        "distill", "--teacher", str(teacher), "--student", "unet-t", "--iterations", str(iterations),
        "--batch-size", str(batch), "--run-dir", str(run_dir), "--quiet",
        "--set", "student.kwargs={model_channels=8, channel_mult=[1, 2], attention_resolutions=[2], "
                 "num_heads=1}",
        "--set", "distill.rho=0.1", "--set", "distill.init_steps=3", "--set", "distill.log_every=2",
        "--set", "distill.save_every=3", "--set", "distill.grid_every=0",
        *(extra or []),
    ]


# -- tiny teachers from the ecosystem (issue 6; used by tests/test_teachers_ecosystem.py) ---------
# Session-scoped builders of a few-thousand-parameter diffusers pipeline (pixel and latent), an
# improved-diffusion state dict, and an offline Hugging Face cache. Reuse them, e.g. for
# `dkdm distill --teacher <path>` tests.

import shutil as _eco_shutil  # noqa: E402

import pytest as _eco_pytest  # noqa: E402
import torch as _eco_torch  # noqa: E402

ECO_ADM_ARCH = "improved-diffusion"
ECO_ADM_FLAGS = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                     attention_resolutions="4", num_heads=2, learn_sigma=True, diffusion_steps=100,
                     noise_schedule="cosine")


def _eco_randomize(module, std=0.2, seed=0):
    """Non-zero weights everywhere (zero-initialised output layers would make tests vacuous)."""
    gen = _eco_torch.Generator().manual_seed(seed)
    with _eco_torch.no_grad():
        for p in module.parameters():
            p.copy_(_eco_torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def eco_tiny_unet2d(*, in_channels=3, out_channels=6, sample_size=8):
    """A ~12k-parameter diffusers UNet2DModel with one attention level."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
                       layers_per_block=1, block_out_channels=(4, 8),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                       attention_head_dim=4)
    return _eco_randomize(unet)


def eco_tiny_vqmodel(*, scaling_factor=0.7):
    """A tiny diffusers VQModel: 16x16x3 images <-> 8x8x3 latents."""
    from diffusers import VQModel

    vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                 layers_per_block=1, latent_channels=3, norm_num_groups=2, num_vq_embeddings=16,
                 vq_embed_dim=3, sample_size=16, scaling_factor=scaling_factor)
    return _eco_randomize(vq, std=0.1)


def eco_write_ddpm_folder(path, *, variance_type="learned_range", prediction_type="epsilon",
                          beta_schedule="squaredcos_cap_v2", num_train_timesteps=100, **scheduler_kw):
    """A diffusers DDPMPipeline folder (model_index.json, unet/, scheduler/) saved by diffusers."""
    from diffusers import DDPMPipeline, DDPMScheduler

    learned = variance_type in ("learned", "learned_range")
    unet = eco_tiny_unet2d(out_channels=6 if learned else 3)
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, variance_type=variance_type,
                              prediction_type=prediction_type, beta_schedule=beta_schedule,
                              **scheduler_kw)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path))
    return path


def eco_write_ldm_folder(path):
    """A diffusers LDMPipeline folder (unet/, vqvae/, scheduler/ with a DDIM config) as LDM ships."""
    from diffusers import DDIMScheduler, LDMPipeline

    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear",
                              beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=eco_tiny_vqmodel(), unet=eco_tiny_unet2d(out_channels=3),
                scheduler=scheduler).save_pretrained(str(path))
    return path


def eco_write_adm_checkpoint(path, *, arch=ECO_ADM_ARCH, flags=None, seed=0):
    """An improved-diffusion-format state dict (.pt) for `flags`, written with torch.save."""
    from dkdm_cli.teachers.adm import build_unet, resolve_flags, to_adm_state_dict

    model = _eco_randomize(build_unet(resolve_flags(arch, flags or ECO_ADM_FLAGS)), std=0.05, seed=seed)
    _eco_torch.save(to_adm_state_dict(model), path)
    return path


@_eco_pytest.fixture(scope="session")
def tiny_diffusers_teacher_dir(tmp_path_factory):
    """A pixel-space diffusers folder: 8x8x3, learned-range variance, cosine T=100."""
    return eco_write_ddpm_folder(tmp_path_factory.mktemp("eco") / "tiny-ddpm")


@_eco_pytest.fixture(scope="session")
def tiny_latent_teacher_dir(tmp_path_factory):
    """A latent diffusers folder: VQModel 16x16x3 <-> 8x8x3 latents, DDIM config, T=100."""
    return eco_write_ldm_folder(tmp_path_factory.mktemp("eco") / "tiny-ldm")


@_eco_pytest.fixture(scope="session")
def tiny_adm_checkpoint(tmp_path_factory):
    """(path, arch, arch_kwargs) of an improved-diffusion .pt state dict (8x8x3, T=100)."""
    path = eco_write_adm_checkpoint(tmp_path_factory.mktemp("eco") / "tiny-adm.pt")
    return path, ECO_ADM_ARCH, dict(ECO_ADM_FLAGS)


class EcoHubCache:
    """An offline Hugging Face cache in a temp folder; `add` lays a folder out as the hub does."""

    def __init__(self, root):
        self.dir = root

    def add(self, repo_id, folder, *, revision="main", commit="0123456789abcdef0123456789abcdef01234567"):
        """Copy `folder` in as snapshot `commit` of `repo_id`, with refs/<revision> pointing at it."""
        repo = self.dir / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / commit
        _eco_shutil.copytree(folder, snapshot, dirs_exist_ok=True)
        (repo / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)  # refs/pr/N nests
        (repo / "refs" / revision).write_text(commit)
        return snapshot


@_eco_pytest.fixture
def hf_offline_cache(tmp_path, monkeypatch):
    """HF_HOME/HF_HUB_CACHE in tmp and HF_HUB_OFFLINE=1: nothing can reach the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hf" / "hub").mkdir(parents=True)
    return EcoHubCache(tmp_path / "hf" / "hub")


@_eco_pytest.fixture
def dkdm_cache_in_tmp(tmp_path, monkeypatch):
    """platformdirs' user cache (where direct-link teachers go) in tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "dkdm"


# -- run directories and Inception weights (issue 7; tests/test_evaluate.py, test_export.py,
# test_sample_cli.py) ----------------------------------------------------------------------------
# A run directory is made by writing one checkpoint with save_checkpoint, as the engine does, so
# these tests do not depend on `dkdm distill`. The Inception weights are torch-fidelity's
# architecture with random (Kaiming) weights: the offline path, with the real code, in a second.

import json as _ev_json  # noqa: E402

TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2)


def make_run_dir(run_dir: Path, teacher_file: Path, *, student: str = "unet-t",
                 student_kwargs: dict | None = None, step: int = 12, seed: int = 0,
                 metrics: list[dict] | None = None) -> Path:
    """A run directory whose one checkpoint holds a tiny student (raw weights and a different EMA
    copy) of `teacher_file`, with every key the checkpoint format requires."""
    from dkdm_cli.checkpoint import checkpoint_path, save_checkpoint
    from dkdm_cli.config import Config
    from dkdm_cli.models.io import read_model_doc

    tdoc = read_model_doc(teacher_file)
    kw = tdoc["model"]["kwargs"]
    kwargs = dict(student_kwargs if student_kwargs is not None else
                  (TINY_UNET if student.startswith("unet") else TINY_DIT))
    torch.manual_seed(seed)
    model = create_model(student, image_size=kw["image_size"], in_channels=kw["in_channels"],
                         learn_sigma=kw["learn_sigma"], **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised outputs
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: (v + 0.01 * torch.randn_like(v)) if v.is_floating_point() else v.clone()
           for k, v in raw.items()}
    tensors = {**{f"student/{k}": v for k, v in raw.items()}, **{f"ema/{k}": v for k, v in ema.items()}}
    cfg = Config().to_dict()
    cfg["teacher"]["name"] = str(teacher_file)
    cfg["student"].update(name=student, kwargs=kwargs)
    doc = {"step": step, "model": model.spec.to_dict(), "diffusion": tdoc["diffusion"],
           "sample_shape": [kw["in_channels"], kw["image_size"], kw["image_size"]],
           "teacher": str(Path(teacher_file).resolve()), "autoencoder_from": None, "config": cfg,
           "optim_param_groups": [], "ema_num_updates": step}
    save_checkpoint(checkpoint_path(run_dir, step), tensors, doc)
    for record in metrics or []:
        with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
            fh.write(_ev_json.dumps(record) + "\n")
    return Path(run_dir)


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_teacher_file) -> Path:
    """A UNet student's run directory (8x8x1, T = 20) with two metrics records."""
    return make_run_dir(tmp_path_factory.mktemp("runs") / "tiny-unet", tiny_teacher_file,
                        metrics=[{"iteration": 6, "loss": 0.5}, {"iteration": 12, "loss": 0.25}])


@pytest.fixture(scope="session")
def tiny_dit_run_dir(tmp_path_factory, tiny_teacher_file) -> Path:
    """A DiT student's run directory (8x8x1, patch 2)."""
    return make_run_dir(tmp_path_factory.mktemp("runs") / "tiny-dit", tiny_teacher_file,
                        student="dit-t/2", seed=1)


def make_inception_weights(path: Path, *, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 with random Kaiming weights, saved as its own weights files
    are (a plain state dict that feature_extractor_weights_path accepts)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A random-weights Inception file for the offline path (named as torch-fidelity names it)."""
    return make_inception_weights(tmp_path_factory.mktemp("inception") /
                                  "weights-inception-2015-12-05-6726825d.pth")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails loudly: these tests are offline by construction."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
