"""One offline switch for every download (hub teachers, direct links, Inception weights); the
diffusion tables never reach a device as float64 (mps has none); and teachers/ without import
cycles, with one answer to "run directory, model file or teacher?"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from dkdm_cli import _offline
from dkdm_cli.errors import OfflineError

pytestmark = pytest.mark.usefixtures("no_network")


@pytest.fixture
def online(monkeypatch):
    """Neither switch set, and huggingface_hub's import-time value off."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DKDM_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


# -- one offline switch ----------------------------------------------------------------------

@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "DKDM_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), ("TRUE", True), ("yes", True),
                                           ("On", True), ("0", False), ("false", False), ("", False)])
def test_every_spelling_huggingface_hub_accepts(online, monkeypatch, var, value, offline):
    from huggingface_hub.constants import _is_true

    monkeypatch.setenv(var, value)
    assert _offline.is_offline() is offline
    assert _is_true(value) is offline  # the same rule as huggingface_hub's own


@pytest.mark.parametrize("value", ["maybe", "2", "offline", "y"])
def test_a_dkdm_offline_that_is_neither_true_nor_false_is_refused(online, monkeypatch, capsys, value):
    from dkdm_cli.cli import run
    from dkdm_cli.errors import UserError

    monkeypatch.setenv("DKDM_OFFLINE", value)
    with pytest.raises(UserError, match="DKDM_OFFLINE"):
        _offline.is_offline()
    assert run(["students", "--image-size", "8"]) == 2  # any command, before it runs
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and value in err and "true, yes or on" in err, err


def test_direct_link_teacher_honours_hf_hub_offline_true(online, monkeypatch, tmp_path):
    from dkdm_cli.teachers.public import download_once

    src = tmp_path / "remote.pt"
    src.write_bytes(b"x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE is set"):
        download_once(src.as_uri(), tmp_path / "cache" / "model.pt")
    assert not (tmp_path / "cache" / "model.pt").exists()


def test_hub_teacher_honours_dkdm_offline_without_any_network_call(online, monkeypatch,
                                                                    hf_offline_cache):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("DKDM_OFFLINE", "yes")

    def called(*args, **kwargs):
        raise AssertionError("the hub was asked although DKDM_OFFLINE is set")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", called)
    from dkdm_cli.teachers.spec import resolve_teacher

    with pytest.raises(OfflineError, match="DKDM_OFFLINE is set"):
        resolve_teacher("hf:dkdm-test/absent")


def test_inception_weights_use_the_same_switch(online, monkeypatch, tmp_path):
    from dkdm_cli.evaluate import inception

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DKDM_OFFLINE", "on")
    monkeypatch.setattr(inception, "network_unreachable", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(OfflineError, match="DKDM_OFFLINE is set"):
        inception.resolve_weights(None)


def test_hub_downloads_safetensors_or_bin_never_both():
    from dkdm_cli.teachers.hub import allow_patterns

    ldm_pr7 = ["unet/config.json", "unet/diffusion_pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors", "vqvae/config.json",
               "vqvae/diffusion_pytorch_model.bin", "vqvae/diffusion_pytorch_model.safetensors",
               "scheduler/scheduler_config.json", "model_index.json"]
    patterns = allow_patterns(ldm_pr7)
    assert not any(p.endswith(".bin*") for p in patterns)
    celeba_main = ["config.json", "diffusion_pytorch_model.bin", "model_index.json",
                   "scheduler_config.json"]
    patterns = allow_patterns(celeba_main)
    assert "diffusion_pytorch_model.bin*" in patterns
    assert "diffusion_pytorch_model*.safetensors*" not in patterns
    offline = allow_patterns(None)  # reading the cache: whichever is there
    assert {"unet/diffusion_pytorch_model.bin*", "unet/diffusion_pytorch_model*.safetensors*"} <= set(offline)


def test_hub_cache_with_only_bin_weights_counts_as_cached(hf_offline_cache, tmp_path):
    from dkdm_cli.teachers.hub import is_hub_cached

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"0")
    hf_offline_cache.add("google/ddpm-ema-celebahq-256", folder)
    assert is_hub_cached("google/ddpm-ema-celebahq-256")


# -- mps: no float64 on the device ---------------------------------------------------------------

def test_tables_are_cast_before_they_move(monkeypatch):
    from dkdm_cli.diffusion.gaussian import GaussianDiffusion

    diffusion = GaussianDiffusion(torch.linspace(1e-4, 0.02, 50).double().numpy())
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type != "cpu" and out.dtype == torch.float64:
            moved.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy)
    for dtype in (torch.float32, torch.float16):
        like = torch.empty(2, 3, 4, 4, device="meta", dtype=dtype)  # stands in for an mps tensor
        t = torch.tensor([0, 49], device="meta")
        mean, var, _ = diffusion.q_mean_variance(like, t)
        assert mean.dtype == dtype and var.dtype == dtype and mean.device.type == "meta"
    assert moved == []
    x0 = torch.randn(2, 3, 4, 4)
    t = torch.tensor([3, 40])
    expected = diffusion.sqrt_alphas_cumprod[t].float().reshape(-1, 1, 1, 1) * x0
    torch.testing.assert_close(diffusion.q_mean_variance(x0, t)[0], expected, rtol=0, atol=0)


# -- teachers/ structure ---------------------------------------------------------------------------

def _teacher_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("dkdm_cli.teachers.")}


def test_no_import_cycles_inside_teachers():
    import dkdm_cli.teachers as pkg

    folder = Path(pkg.__file__).parent
    modules = {f"dkdm_cli.teachers.{p.stem}": p for p in folder.glob("*.py") if p.stem != "__init__"}
    graph = {m: {i for i in _teacher_imports(p) if i in modules} for m, p in modules.items()}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])

    assert not [m for m in graph if reaches(m, m)]
    assert "dkdm_cli.teachers.spec" not in graph["dkdm_cli.teachers.native"]


def test_denoiser_is_the_public_teacher():
    from dkdm_cli import api

    assert api.Teacher is api.Denoiser and "Denoiser" in api.__all__


def test_three_callers_share_one_resolver(monkeypatch, tiny_run_dir):
    from dkdm_cli import api
    from dkdm_cli.commands import sample as sample_cmd
    from dkdm_cli.evaluate.scoring import _load_model
    from dkdm_cli.teachers import spec

    calls = []

    def fake(spec_, *, ema=True, device="cpu", students_only=False):
        calls.append((str(spec_), ema, students_only))
        return "denoiser"

    monkeypatch.setattr(spec, "load_denoiser", fake)
    assert api.load_student(tiny_run_dir, ema=False) == "denoiser"
    assert sample_cmd.load_source(None, str(tiny_run_dir), ema=True, device="cpu") == "denoiser"
    assert sample_cmd.load_source("digits", None, ema=True, device="cpu") == "denoiser"
    assert _load_model(str(tiny_run_dir), ema=True, device="cpu") == "denoiser"
    assert calls == [(str(tiny_run_dir), False, True), (str(tiny_run_dir), True, True),
                     ("digits", True, False), (str(tiny_run_dir), True, False)]


def test_no_ema_is_refused_for_exports_and_teachers(tiny_teacher_file):
    from dkdm_cli.errors import UserError
    from dkdm_cli.teachers.spec import load_denoiser

    for source in (str(tiny_teacher_file), "digits"):
        with pytest.raises(UserError, match="--no-ema applies to run directories"):
            load_denoiser(source, ema=False)
