"""Shared fixtures: tiny teachers built on the fly (nothing is downloaded), a temp home."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dkdm_cli import testing
from dkdm_cli.models import create_model

TINY_UNET = testing.TINY_UNET


make_tiny_teacher_file = testing.write_teacher_file


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

ECO_ADM_ARCH, ECO_ADM_FLAGS = testing.ADM_ARCH, testing.ADM_FLAGS
_eco_randomize = testing.randomize
eco_tiny_unet2d, eco_tiny_vqmodel = testing.tiny_unet2d, testing.tiny_vqmodel
eco_write_ddpm_folder, eco_write_ldm_folder = testing.write_ddpm_folder, testing.write_ldm_folder
eco_write_adm_checkpoint = testing.write_adm_checkpoint


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
                 metrics: list[dict] | None = None, sampler: dict | None = None) -> Path:
    """A run directory whose one checkpoint holds a tiny student (raw weights and a different EMA
    copy) of `teacher_file` (any teacher spec: a latent one records its autoencoder), with
    every key the checkpoint format requires (`sampler`: a few-step student's record)."""
    from dkdm_cli.checkpoint import checkpoint_path, save_checkpoint
    from dkdm_cli.config import Config
    from dkdm_cli.distill.runs import teacher_reference
    from dkdm_cli.distill.state import student_settings
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher(str(teacher_file))
    c, size, _ = teacher.sample_shape
    kwargs = dict(student_kwargs if student_kwargs is not None else
                  (TINY_UNET if student.startswith("unet") else TINY_DIT))
    torch.manual_seed(seed)
    model = create_model(student, image_size=size, in_channels=c,
                         learn_sigma=teacher.learn_sigma, **kwargs)
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
    spec = teacher_reference(str(teacher_file))  # as the engine records it
    doc = {"step": step, "model": model.spec.to_dict(),
           "diffusion": student_settings(teacher.settings).to_dict(),
           "sample_shape": [c, size, size], "teacher": spec,
           "autoencoder_from": spec if teacher.autoencoder is not None else None, "config": cfg,
           "optim_param_groups": [], "ema_num_updates": step, "sampler": sampler}
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
