"""`dkdm export --format diffusers`: the folder loads with DiffusionPipeline.from_pretrained(...,
trust_remote_code=True) in a process where importing dkdm_cli fails and makes `dkdm sample`'s
images from the same noise (UNet, DDIM, DiT, class-conditional with CFG, latent, a few-step
student's consistency sampling); dkdm reads it
back as a model and a teacher; the shipped code is generated from dkdm's and complete; refusals."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, make_run_dir

from dkdm_cli import export as E
from dkdm_cli.api import load_student, load_teacher
from dkdm_cli.checkpoint import load_latest, student_from_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.diffusers_export import folder as F
from dkdm_cli.diffusers_export.components import DKDMDiT, DKDMUNet
from dkdm_cli.diffusers_export.layout import is_export_folder
from dkdm_cli.diffusers_export.standalone import render, shipped_files
from dkdm_cli.errors import ExportCheckError
from dkdm_cli.models import MODELS, create_model
from dkdm_cli.models.dit import DiT
from dkdm_cli.models.unet import UNet

# Loads every job's folder with diffusers alone: dkdm_cli cannot be imported in this process.
NO_DKDM_LOADER = r'''
import importlib.abc, json, sys

class NoDkdm(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dkdm_cli" or name.startswith("dkdm_cli."):
            raise ImportError(name + " is blocked: the export must load without dkdm")

sys.meta_path.insert(0, NoDkdm())
try:
    import dkdm_cli  # noqa: F401
    raise SystemExit("dkdm_cli was importable")
except ImportError:
    pass
import numpy as np, torch
from diffusers import DiffusionPipeline

for job in json.load(open(sys.argv[1])):
    pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True)
    if job["sampler"] != "iddpm":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, sampler=job["sampler"])
    latents = torch.randn(job["shape"], generator=torch.Generator().manual_seed(job["seed"]))
    out = pipe(latents=latents, generator=torch.Generator().manual_seed(job["seed"] + 1),
               num_inference_steps=job["steps"], output_type="np", class_labels=job["labels"],
               guidance_scale=job["cfg"])
    np.save(job["out"], out.images)
    pil = pipe(batch_size=2, num_inference_steps=2, class_labels=job["labels"] and job["labels"][0],
               return_dict=False)[0]
    assert len(pil) == 2 and (job["latent"] or pil[0].size == tuple(job["shape"][-2:])), pil
assert not any(m == "dkdm_cli" or m.startswith("dkdm_cli.") for m in sys.modules)
print("loaded", len(json.load(open(sys.argv[1]))), "folders without dkdm")
'''

COND_KWARGS = {**TINY_UNET, "num_classes": 3, "class_null": True}
# name -> (run fixture, sampler, steps, labels, cfg)
JOBS = {
    "unet": ("tiny_run_dir", "iddpm", 5, None, 1.0),
    "unet-ddim": ("tiny_run_dir", "ddim", 4, None, 1.0),
    "dit": ("tiny_dit_run_dir", "iddpm", 3, None, 1.0),
    "cond-cfg": ("cond_run_dir", "iddpm", 4, [1, 2, 0, 1], 2.5),
    "latent": ("latent_run_dir", "iddpm", 3, None, 1.0),
    "few-step": ("fewstep_run_dir", "consistency", 3, None, 1.0),
}


@pytest.fixture(scope="module")
def fewstep_run_dir(tmp_path_factory, tiny_teacher_file) -> Path:
    """A few-step student: it records multistep consistency sampling (from step 18 of 20)."""
    return make_run_dir(tmp_path_factory.mktemp("runs") / "fast", tiny_teacher_file, seed=4,
                        sampler={"name": "consistency", "top": 18})


@pytest.fixture(scope="module")
def cond_run_dir(tmp_path_factory, tiny_cond_teacher_file) -> Path:
    """A class-conditional UNet student (3 classes + null) of the tiny conditional teacher."""
    return make_run_dir(tmp_path_factory.mktemp("runs") / "cond", tiny_cond_teacher_file,
                        student_kwargs=COND_KWARGS, seed=2)


@pytest.fixture(scope="module")
def latent_run_dir(tmp_path_factory, tiny_latent_teacher_dir) -> Path:
    """A student of the tiny LDM teacher (8x8x3 latents, VQModel decoder)."""
    return make_run_dir(tmp_path_factory.mktemp("runs") / "latent", tiny_latent_teacher_dir, seed=3)


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    """Each run exported once, every job sampled by diffusers without dkdm in ONE subprocess:
    {job: (run_dir, folder, images (N, H, W, C) floats in [0, 1])}."""
    root = tmp_path_factory.mktemp("diffusers")
    folders, jobs = {}, []
    for name, (fixture, sampler, steps, labels, cfg) in JOBS.items():
        run_dir = request.getfixturevalue(fixture)
        if fixture not in folders:
            folders[fixture] = root / f"{fixture}-export"
            E.export_student(run_dir, fmt="diffusers", out=folders[fixture])
        model = load_student(run_dir)
        jobs.append({"folder": str(folders[fixture]), "sampler": sampler, "steps": steps,
                     "labels": labels, "cfg": cfg, "seed": 7, "out": str(root / f"{name}.npy"),
                     "shape": [len(labels or [0, 0, 0]), *model.sample_shape],
                     "latent": model.autoencoder is not None})
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", NO_DKDM_LOADER, str(root / "jobs.json")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: (request.getfixturevalue(JOBS[name][0]), folders[JOBS[name][0]],
                   np.load(job["out"])) for name, job in zip(JOBS, jobs, strict=True)}


def _dkdm_sample(model: Path, out: Path, *, num: int, steps: int, sampler: str, labels, cfg) -> np.ndarray:
    argv = ["sample", "--model", str(model), "--num", str(num), "--seed", "7", "--steps",
            str(steps), "--sampler", sampler, "--batch-size", str(num), "--npz", str(out), "--quiet"]
    for label in labels or ():
        argv += ["--class", str(label)]
    if cfg != 1.0:
        argv += ["--cfg", str(cfg)]
    assert run(argv) == 0
    return np.load(out)["arr_0"]  # (N, H, W, C) uint8


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_diffusers_without_dkdm_makes_dkdm_samples_images(job, exported, tmp_path):
    run_dir, folder, images = exported[job]
    _, sampler, steps, labels, cfg = JOBS[job]
    kw = dict(num=len(images), steps=steps, sampler=sampler, labels=labels, cfg=cfg)
    expected = _dkdm_sample(run_dir, tmp_path / "run.npz", **kw)
    assert images.dtype == np.float32 and images.shape == expected.shape
    assert images.min() >= 0 and images.max() <= 1
    # dkdm rounds (x + 1) * 127.5 to uint8: the same float image is within half a level of it.
    assert np.abs(images * 255 - expected).max() <= 0.5 + 1e-3
    # Round trip: dkdm samples the folder exactly as the run it came from.
    np.testing.assert_array_equal(_dkdm_sample(folder, tmp_path / "folder.npz", **kw), expected)


@pytest.mark.slow
def test_the_folder_is_a_teacher_and_a_student(exported, tmp_path):
    run_dir, folder, _ = exported["unet"]
    ema = student_from_checkpoint(load_latest(run_dir)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 19])
    for loaded in (load_student(folder), load_teacher(str(folder))):
        torch.testing.assert_close(loaded.model_output(x, t), ema(x, t), rtol=0, atol=0)
        assert loaded.info["spec"] == load_latest(run_dir).doc["teacher"]
    _, latent_folder, _ = exported["latent"]
    assert type(load_student(latent_folder).autoencoder.vae).__name__ == "VQModel"
    args = ["distill", "--teacher", str(folder), "--student", "unet-t", "--iterations", "2",
            "--batch-size", "2", "--run-dir", str(tmp_path / "chain"), "--quiet",
            "--set", "student.kwargs={model_channels=8, channel_mult=[1, 2], "
                     "attention_resolutions=[2], num_heads=1}",
            "--set", "distill.rho=0.1", "--set", "distill.init_steps=2",
            "--set", "distill.grid_every=0", "--set", "distill.save_every=2"]
    assert run(args) == 0
    assert load_latest(tmp_path / "chain").doc["teacher"] == str(folder.resolve())


@pytest.mark.slow
def test_folder_layout_configs_and_card(exported):
    _, folder, _ = exported["cond-cfg"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dkdm", "DKDMPipeline"] and is_export_folder(folder)
    assert index["unet"] == ["dkdm_models", "DKDMUNet"] and index["vae"] == [None, None]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["sample_size"] == 8 and unet["num_classes"] == 3 and unet["class_null"] is True
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2"  # the tiny teachers are cosine
    assert (scheduler["num_train_timesteps"], scheduler["variance_type"], scheduler["sampler"]) == \
        (20, "learned_range", "iddpm")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "class-conditional" in card
    assert "trust_remote_code=True" in card and "hf upload" in card and "| step | 12 |" in card
    assert "check the teacher's own license" in card
    _, latent, _ = exported["latent"]
    vae = json.loads((latent / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "VQModel" and vae["scaling_factor"] == 0.7  # the teacher's scale
    assert json.loads((latent / "model_index.json").read_text())["vae"] == ["diffusers", "VQModel"]


def test_scheduler_config_uses_ddpm_names_for_every_schedule():
    from diffusers import DDPMScheduler

    from dkdm_cli.diffusion.settings import DiffusionSettings

    for settings, keys in (
        (DiffusionSettings(schedule="linear", num_timesteps=50), {"beta_start": 1e-4, "beta_end": 0.02}),
        (DiffusionSettings(schedule="scaled_linear", num_timesteps=50),
         {"beta_start": 0.0015, "beta_end": 0.0195}),
        (DiffusionSettings(schedule="explicit", num_timesteps=3, betas=(0.1, 0.2, 0.3)),
         {"trained_betas": [0.1, 0.2, 0.3]}),
    ):
        config = F.scheduler_config(settings)
        assert keys.items() <= config.items()
        ddpm = DDPMScheduler.from_config(config)  # other schedulers read the same keys
        ours = settings.build().alphas_cumprod.float()
        torch.testing.assert_close(ddpm.alphas_cumprod, ours, rtol=1e-5, atol=1e-6)


def test_license_follows_the_chain_to_the_first_teacher(tmp_path, tiny_run_dir):
    assert "MIT" in E.teacher_license("digits")
    assert "apache-2.0" in E.teacher_license("ldm-celebahq")
    assert "not recorded by dkdm" in E.teacher_license("dit-xl2-256")
    assert E.original_teacher(str(tiny_run_dir)) == load_latest(tiny_run_dir).doc["teacher"]


# -- the shipped code ------------------------------------------------------------------------------

def _shipped(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for spec in shipped_files():
        paths[spec.name] = tmp_path / f"{spec.name}.py"
        paths[spec.name].write_text(render(spec))
    return paths


def test_shipped_files_define_every_name_and_import_no_dkdm(tmp_path):
    paths = _shipped(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--no-cache",
                           "--select", "F", *map(str, paths.values())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    for path in paths.values():
        assert "dkdm_cli" not in "".join(line for line in path.read_text().splitlines(True)
                                         if line.startswith(("import ", "from ")))


def _parameters(fn) -> dict:
    params = inspect.signature(fn).parameters
    return {("image_size" if k == "sample_size" else k): p.default for k, p in params.items()
            if k != "self"}


@pytest.mark.parametrize("wrapper,network", [(DKDMUNet, UNet), (DKDMDiT, DiT)])
def test_diffusers_wrappers_take_exactly_the_networks_arguments(wrapper, network):
    assert _parameters(wrapper.__init__) == _parameters(network.__init__)


@pytest.mark.parametrize("name", MODELS.names())
def test_shipped_models_build_dkdms_state_dict_for_every_preset(name, tmp_path):
    """Keys and shapes of every preset (class-conditional, with a null row) match, on meta."""
    module = F._import_shipped(_shipped(tmp_path)["dkdm_models"], f"shipped_{abs(hash(name))}")
    with torch.device("meta"):
        ours = create_model(name, image_size=32, in_channels=3, learn_sigma=True, num_classes=4,
                            class_null=True)
        config = F.model_config(ours)
        cls = getattr(module, config.pop("_class_name"))
        shipped = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in shipped.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}


# -- refusals ----------------------------------------------------------------------------------

def test_out_must_be_new_empty_or_an_earlier_export(tiny_run_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = ["export", "--run-dir", str(tiny_run_dir), "--format", "diffusers", "--out", str(mine)]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "not a dkdm diffusers export" in err and len(err.splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "keep"
    again = tmp_path / "again"
    assert run(argv[:-1] + [str(again), "--quiet"]) == 0
    assert run(argv[:-1] + [str(again), "--quiet"]) == 0  # an earlier export is replaced
    assert is_export_folder(again)
    assert run(["export", "--run-dir", str(tiny_run_dir), "--format", "diffusers", "--out",
                str(tiny_run_dir / "checkpoints" / "x")]) == 2


def test_a_failed_check_writes_nothing(tiny_run_dir, tmp_path, monkeypatch):
    def broken(folder, model):
        raise ExportCheckError("boom")

    monkeypatch.setattr(F, "check_folder", broken)
    with pytest.raises(ExportCheckError):
        E.export_student(tiny_run_dir, fmt="diffusers", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp folder


def test_check_folder_catches_weights_that_differ(tiny_run_dir, tmp_path):
    model = student_from_checkpoint(load_latest(tiny_run_dir)).eval()
    extra = E.export_doc(load_latest(tiny_run_dir), tiny_run_dir, ema=True)
    F.write_folder(tmp_path, model, extra=extra)
    assert F.check_folder(tmp_path, model) == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(ExportCheckError, match="different weights"):
        F.check_folder(tmp_path, model)


@pytest.mark.slow
def test_a_few_step_students_folder_samples_with_its_ladder_by_default(exported):
    _, folder, _ = exported["few-step"]
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (config["sampler"], config["top"]) == ("consistency", 18)
