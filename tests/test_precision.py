"""Every teacher family runs in every precision policy on the CPU, within a stated tolerance of
float32: the code a GPU runs under bf16 or fp16 is the code these tests run.

Tolerance (max abs error over max abs value of the float32 output, on random inputs at steps 0,
T/2 and T-1): bf16 0.03, fp16 0.005 (8 and 11 significant bits). Measured here: bf16 0.004-0.014,
fp16 0.0006-0.0013 across the seven families (the digits teacher: 0.0037 and 0.0006). Decoded
images of latent teachers: the same bounds on their [-1, 1] pixels.
"""

from __future__ import annotations

import pytest
import tomli_w
import torch
from conftest import make_run_dir, tiny_distill_args
from test_teachers_dit import write_tiny_dit_folder

from dkdm_cli.cli import run
from dkdm_cli.config import Config
from dkdm_cli.precision import DTYPES, distill_policy, sampling_policy
from dkdm_cli.teachers.spec import resolve_teacher

TOL = {"bf16": 0.03, "fp16": 0.005}
FAMILIES = ["built-in", "adm-pt", "diffusers-unet", "latent-vq", "diffusers-dit-kl", "run-dir-unet",
            "run-dir-dit"]


@pytest.fixture(scope="module")
def family_specs(tmp_path_factory, tiny_adm_checkpoint, tiny_diffusers_teacher_dir,
                 tiny_latent_teacher_dir, tiny_teacher_file):
    """family -> (spec, arch, arch_kwargs)."""
    root = tmp_path_factory.mktemp("families")
    adm, arch, flags = tiny_adm_checkpoint
    return {
        "built-in": ("digits", "", {}),
        "adm-pt": (str(adm), arch, flags),
        "diffusers-unet": (str(tiny_diffusers_teacher_dir), "", {}),
        "latent-vq": (str(tiny_latent_teacher_dir), "", {}),
        "diffusers-dit-kl": (str(write_tiny_dit_folder(root / "dit")), "", {}),
        "run-dir-unet": (str(make_run_dir(root / "run-unet", tiny_teacher_file)), "", {}),
        "run-dir-dit": (str(make_run_dir(root / "run-dit", tiny_teacher_file, student="dit-t/2")),
                        "", {}),
    }


def _load(specs, family, dtype=None):
    spec, arch, flags = specs[family]
    teacher = resolve_teacher(spec, arch=arch, arch_kwargs=flags)
    return teacher if dtype is None else teacher.to("cpu", dtype=dtype)


def _inputs(teacher, n=3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *teacher.sample_shape), generator=gen)  # (n, C, H, W)
    T = teacher.diffusion.num_timesteps
    t = torch.tensor([0, T // 2, T - 1][:n])
    y = torch.arange(n) % teacher.num_classes if teacher.conditional else None
    return x, t, y


def _rel_err(out, ref):
    return float((out - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def test_the_issue_reproduction_runs_in_fp16():
    """The first GPU forward used to fail like this: an fp16 teacher against float32 norms."""
    from dkdm_cli.api import load_teacher

    t = load_teacher("digits")
    t.to("cpu", dtype=torch.float16)
    out = t.model_output(torch.randn(2, 1, 16, 16), torch.tensor([10, 500]))
    assert out.dtype == torch.float32 and out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_in_the_policy_within_tolerance(family, precision, family_specs):
    ref = _load(family_specs, family)
    x, t, y = _inputs(ref)
    want = ref.model_output(x, t, y)
    low = _load(family_specs, family, DTYPES[precision])
    assert low.dtype == DTYPES[precision]  # the network really runs in it
    kept = [p for m in low.model.modules() if getattr(m, "keep_float32", False)
            for p in m.parameters(recurse=False)]
    assert all(p.dtype == torch.float32 for p in kept)  # our norm layers keep float32 weights
    got = low.model_output(x, t, y)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err = _rel_err(got, want)
    assert 0 < err <= TOL[precision], err  # > 0: the low precision really ran
    if ref.autoencoder is not None:
        z = want[:, : ref.sample_shape[0]].clamp(-2, 2)
        img, img_low = ref.decode(z), low.decode(z)
        assert img_low.dtype == torch.float32 and _rel_err(img_low, img) <= TOL[precision]


@pytest.mark.parametrize("family", ["built-in", "run-dir-unet", "run-dir-dit"])
def test_our_models_keep_float32_norms_and_diffusers_models_cast_whole(family, family_specs):
    low = _load(family_specs, family, torch.bfloat16)
    norms = [m for m in low.model.modules() if getattr(m, "keep_float32", False)]
    assert norms  # dkdm's UNet and DiT mark their norms
    others = [p for m in low.model.modules() if not getattr(m, "keep_float32", False)
              for p in m.parameters(recurse=False)]
    assert others and all(p.dtype == torch.bfloat16 for p in others)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_distill_runs_every_family_in_the_policy(family, precision, family_specs, tmp_path):
    spec, arch, flags = family_specs[family]
    rd = tmp_path / "run"
    extra = ["--set", f'distill.teacher_precision="{precision}"',
             "--set", 'distill.precision="bf16"', "--set", "distill.init_batch_size=8"]
    if arch:  # an improved-diffusion .pt names its architecture in the project file
        config = tmp_path / "dkdm.toml"
        config.write_text(tomli_w.dumps({"teacher": {"arch": arch, "arch_kwargs": flags}}))
        extra += ["--config", str(config)]
    if spec == "digits":
        extra += ["--set", "distill.rho=0.01"]
    args = tiny_distill_args(spec, rd, iterations=2, extra=extra)
    assert run(args) == 0
    resolved = (rd / "config.resolved.toml").read_text()
    assert f'teacher_precision = "{precision}"' in resolved
    assert f"network: {precision} (dkdm's norm layers float32)" in resolved  # what ran, said
    assert "student: bf16 autocast" in resolved


def test_auto_policy_is_float32_on_the_cpu_and_explicit_ones_are_obeyed():
    d = Config().distill
    cpu = torch.device("cpu")
    auto = distill_policy(d, cpu)
    assert (auto.network, auto.student, auto.compile) == (torch.float32, None, False)
    import dataclasses

    low = distill_policy(dataclasses.replace(d, precision="bf16", teacher_precision="fp16",
                                             compile="on"), cpu)
    assert (low.network, low.student, low.compile) == (torch.float16, torch.bfloat16, True)
    assert sampling_policy("bf16", cpu).network is torch.bfloat16
    assert low.describe()["network"] == "fp16 (dkdm's norm layers float32)"


def test_sample_runs_in_the_policy(tmp_path, tiny_run_dir, capsys):
    out = {}
    for precision in ("fp32", "bf16"):
        npz = tmp_path / f"{precision}.npz"
        assert run(["sample", "--model", str(tiny_run_dir), "--num", "4", "--steps", "5",
                    "--npz", str(npz), "--precision", precision, "--quiet"]) == 0
        import numpy as np

        out[precision] = np.load(npz)["arr_0"].astype(int)
    diff = abs(out["fp32"] - out["bf16"])
    assert diff.max() > 0 and diff.mean() < 12  # the same images up to bf16 rounding


@pytest.mark.slow
def test_compiled_run_saves_plain_weights_and_resumes(tiny_teacher_file, tmp_path, monkeypatch):
    """compile = "on" (here with the aot_eager backend: inductor's CPU compile takes minutes)
    trains through torch.compile, saves the unwrapped student, and resumes."""
    from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint

    monkeypatch.setenv("DKDM_COMPILE_BACKEND", "aot_eager")
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=3,
                             extra=["--set", 'distill.compile="on"'])
    assert run(args) == 0
    ckpt = read_checkpoint(list_checkpoints(rd)[-1])
    assert ckpt.doc["runtime"]["compile"] is True
    assert not [k for k in ckpt.tensors if "_orig_mod" in k]
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=4,
                                 extra=["--set", 'distill.compile="on"'])) == 0
    assert read_checkpoint(list_checkpoints(rd)[-1]).step == 4
