"""DPM-Solver++(2M) and UniPC in `dkdm sample` are diffusers' own: the same images as diffusers'
DDPMPipeline with that scheduler, on a tiny diffusers teacher from the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dkdm_cli import testing
from dkdm_cli.config import SAMPLERS
from dkdm_cli.diffusion.samplers import Sampler, sample
from dkdm_cli.diffusion.solvers import make_scheduler
from dkdm_cli.teachers.spec import resolve_teacher


def test_config_lists_every_sampler():
    assert tuple(s.value for s in Sampler) == SAMPLERS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # fixed-small variance and clip_sample: what DDPMPipeline folders usually carry
    return testing.write_ddpm_folder(tmp_path_factory.mktemp("solvers") / "ddpm",
                                     variance_type="fixed_small", num_train_timesteps=100)


@pytest.mark.parametrize("kind", ["dpm-solver++", "unipc"])
@pytest.mark.parametrize("clip", [True, False])
def test_solver_equals_diffusers_pipeline(kind, clip, folder):
    from diffusers import DDPMPipeline, UNet2DModel

    teacher = resolve_teacher(str(folder))
    unet = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    scheduler = make_scheduler(kind, teacher.diffusion, clip_denoised=clip)
    if kind == "unipc":  # DDPMPipeline hands step() a generator, which UniPC (deterministic) lacks
        step = scheduler.step
        scheduler.step = lambda *a, generator=None, **k: step(*a, **k)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    want = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=6,
                output_type="np").images  # (2, 8, 8, 3) in [0, 1]
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))  # as the pipeline
    x0 = sample(teacher.denoise, teacher.diffusion, noise=noise, steps=6, sampler=kind,
                clip_denoised=clip)
    got = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, 0.5, atol=0.05)  # not a trivial image


def test_solvers_refuse_more_steps_than_the_process_has(folder):
    from dkdm_cli.errors import ConfigError

    teacher = resolve_teacher(str(folder))
    with pytest.raises(ConfigError, match="between 1 and the model's T = 100"):
        sample(teacher.denoise, teacher.diffusion, noise=torch.zeros(1, 3, 8, 8), steps=101,
               sampler="dpm-solver++")


def test_dkdm_sample_cli_runs_the_solvers(tmp_path, tiny_run_dir):
    from dkdm_cli.cli import run

    for kind in ("dpm-solver++", "unipc"):
        npz = tmp_path / f"{kind}.npz"
        assert run(["sample", "--model", str(tiny_run_dir), "--num", "3", "--steps", "4",
                    "--sampler", kind, "--npz", str(npz), "--quiet"]) == 0
        assert np.load(npz)["arr_0"].shape == (3, 8, 8, 1)
