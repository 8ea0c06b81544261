"""Writing a student as a diffusers pipeline folder (layout.py), checked, then moved into place.

The folder is built in a temp folder beside `--out`. Before it replaces anything, diffusers
itself loads the model component from it with the shipped code (ModelMixin.from_pretrained on
the generated dkdm_models.py): every tensor must equal the student's and its output on a
probe batch must match, or nothing is written (ExportCheckError, exit 1).

Latent students ship their teacher's autoencoder (vae/), saved by diffusers with the latent
scale dkdm decodes with written into its config (`scaling_factor`, `shift_factor`), so the
pipeline decodes as dkdm does. A teacher whose decoder is a Python function (a `py:` teacher
with `decode=`) cannot be shipped, and is refused in one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _fs
from dkdm_cli.diffusers_export.layout import AUTOENCODER, MODEL_FOLDERS, PIPELINE_CLASS, WEIGHTS
from dkdm_cli.diffusers_export.standalone import (
    MODELS_MODULE,
    PIPELINE_MODULE,
    SCHEDULER_MODULE,
    render,
    shipped_files,
)
from dkdm_cli.diffusion.schedules import linear_betas, scaled_linear_betas
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import ExportCheckError, UserError
from dkdm_cli.models.dit import DiT
from dkdm_cli.models.unet import UNet

CHECK_TOLERANCE = 1e-6  # the same code on the same weights: any difference is a bug
# dkdm's schedule names -> diffusers' beta_schedule (same formulas; components.BETA_SCHEDULES).
_BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
_DEFAULT_RANGE = {"linear": linear_betas, "scaled_linear": scaled_linear_betas}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def model_component(model: nn.Module) -> str:
    """The folder the network goes to: unet/ (dkdm's UNet) or transformer/ (its DiT)."""
    if isinstance(model, UNet):
        return "unet"
    if isinstance(model, DiT):
        return "transformer"
    raise UserError(f"{type(model).__name__} students cannot be exported to diffusers yet "
                    "(dkdm's UNet and DiT can); export --format safetensors")


def model_config(model: nn.Module) -> dict[str, Any]:
    """config.json of the model component: the network's constructor arguments."""
    kwargs = dict(model.init_kwargs)
    kwargs["sample_size"] = kwargs.pop("image_size")
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    name = MODEL_FOLDERS[model_component(model)]
    return {"_class_name": name, "_diffusers_version": _diffusers_version(), **kwargs}


def _beta_range(settings: DiffusionSettings) -> dict[str, float]:
    """beta_start / beta_end of a linear or scaled-linear schedule, dkdm's defaults filled in."""
    defaults = inspect.signature(_DEFAULT_RANGE[settings.schedule]).parameters
    return {key: float(getattr(settings, key) if getattr(settings, key) is not None
                       else defaults[key].default) for key in ("beta_start", "beta_end")}


def scheduler_config(settings: DiffusionSettings, *, sampler: str = "iddpm",
                     eta: float = 0.0, top: int | None = None) -> dict[str, Any]:
    """scheduler_config.json for DKDMScheduler: DDPMScheduler's keys, plus the sampler."""
    if settings.timestep_scale != 1.0:
        raise UserError("a model called on rescaled timesteps cannot be exported to diffusers")
    config: dict[str, Any] = {
        "_class_name": "DKDMScheduler", "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": settings.num_timesteps, "prediction_type": settings.prediction,
        "variance_type": settings.variance, "clip_sample": settings.clip_denoised,
        "sampler": sampler, "eta": float(eta)}
    if top is not None:
        config["top"] = int(top)
    if settings.schedule == "explicit":
        config["trained_betas"] = [float(b) for b in settings.betas or ()]
    else:
        config["beta_schedule"] = _BETA_NAMES[settings.schedule]
        if settings.schedule in _DEFAULT_RANGE:
            config.update(_beta_range(settings))
    return config


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    _fs.write_text(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")


def _save_autoencoder(autoencoder, folder: Path) -> str:
    """Save a latent teacher's diffusers autoencoder with dkdm's latent scale in its config;
    returns its class name."""
    from dkdm_cli.teachers.autoencoders import DiffusersAutoencoder

    if not isinstance(autoencoder, DiffusersAutoencoder):
        raise UserError("the teacher decodes latents with its own Python code, which a diffusers "
                        "folder cannot carry; export --format safetensors instead")
    vae = autoencoder.vae
    kind = type(vae).__name__
    scale = {"scaling_factor": float(autoencoder.scaling_factor)}
    if autoencoder.shift_factor:
        if "shift_factor" not in inspect.signature(type(vae).__init__).parameters:
            raise UserError(f"a {kind} with a latent shift cannot be exported to diffusers")
        scale["shift_factor"] = float(autoencoder.shift_factor)
    vae.register_to_config(**scale)
    with _quiet():
        vae.save_pretrained(str(folder), safe_serialization=True)
    return kind


@contextlib.contextmanager
def _quiet():
    """diffusers' loading and saving chatter kept off stdout (it would corrupt --json)."""
    from diffusers.utils import logging as diffusers_logging

    log = io.StringIO()
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its handler writes to the stderr it started with
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def write_folder(folder: Path, model: nn.Module, *, extra: dict[str, Any],
                 autoencoder=None, sampler: str = "iddpm", eta: float = 0.0,
                 top: int | None = None) -> dict[str, Any]:
    """Fill `folder` (empty) with the pipeline; returns model_index.json's document."""
    from dkdm_cli.models.io import save_model

    component = model_component(model)
    settings = DiffusionSettings.from_dict(extra["diffusion"])
    files = {spec.name: render(spec) for spec in shipped_files()}
    index: dict[str, Any] = {"_class_name": list(PIPELINE_CLASS),
                             "_diffusers_version": _diffusers_version(),
                             "scheduler": [SCHEDULER_MODULE, "DKDMScheduler"],
                             "unet": [None, None], "transformer": [None, None],
                             AUTOENCODER: [None, None]}
    index[component] = [MODELS_MODULE, MODEL_FOLDERS[component]]
    _fs.write_text(folder / f"{PIPELINE_MODULE}.py", files[PIPELINE_MODULE])
    _fs.write_text(folder / component / f"{MODELS_MODULE}.py", files[MODELS_MODULE])
    _write_json(folder / component / "config.json", model_config(model))
    # The weights file is also a dkdm model file (its header holds the document), so dkdm reads
    # the folder back exactly; "format": "pt" is what the hub's tools expect in the header.
    save_model(model, folder / component / WEIGHTS, extra=extra, metadata={"format": "pt"})
    _fs.write_text(folder / "scheduler" / f"{SCHEDULER_MODULE}.py", files[SCHEDULER_MODULE])
    _write_json(folder / "scheduler" / "scheduler_config.json",
                scheduler_config(settings, sampler=sampler, eta=eta, top=top))
    if autoencoder is not None:
        index[AUTOENCODER] = ["diffusers", _save_autoencoder(autoencoder, folder / AUTOENCODER)]
    _write_json(folder / "model_index.json", index)
    return index


def _import_shipped(path: Path, name: str):
    """Execute a generated module from the folder (dataclasses need it in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def check_folder(folder: Path, model: nn.Module) -> float:
    """Load the model component with diffusers and the shipped code; every tensor must equal
    the student's, and the output on a probe batch must match (returns the max difference)."""
    component = model_component(model)
    module = _import_shipped(folder / component / f"{MODELS_MODULE}.py", f"_dkdm_check_{id(folder)}")
    with _quiet():
        loaded = getattr(module, MODEL_FOLDERS[component]).from_pretrained(str(folder / component))
    mine, theirs = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in set(mine) | set(theirs)
                    if k not in mine or k not in theirs or not torch.equal(mine[k], theirs[k]))
    if differ:
        raise ExportCheckError(f"diffusers loads different weights from the export ({len(differ)} "
                               f"tensors, e.g. {differ[0]}); nothing was written")
    kw = model.init_kwargs
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, kw["in_channels"], kw["image_size"], kw["image_size"]), generator=gen)
    t = torch.tensor([0, 1])
    y = (torch.tensor([0, kw["num_classes"] - 1]),) if kw.get("num_classes") else ()
    with torch.no_grad():
        diff = float((loaded.eval()(x, t, *y).sample - model.eval()(x, t, *y)).abs().max())
    if not diff <= CHECK_TOLERANCE:
        raise ExportCheckError(f"the exported model's output differs from the student's by {diff:.3g}; "
                               "nothing was written. Report the architecture")
    return diff


def _run_sampler(extra: dict[str, Any]) -> tuple[str, float, int | None]:
    """(sampler, eta, top) the student samples with: the one it was made for (a few-step
    student's consistency sampling), else its run's [sample] sampler (auto: iddpm) and eta."""
    recorded = extra.get("sampler") or {}
    sample = ((extra.get("distillation") or {}).get("config") or {}).get("sample") or {}
    if recorded.get("name"):
        return str(recorded["name"]), 0.0, recorded.get("top")
    sampler = str(sample.get("sampler", "iddpm"))
    return ("iddpm" if sampler == "auto" else sampler), float(sample.get("eta", 0.0)), None


def export_folder(model: nn.Module, out: Path, *, extra: dict[str, Any], result,
                  card: Callable[[Path], str]) -> None:
    """Write the student as a diffusers folder at `out` (checked beforehand by export.check_out):
    built in a temp folder, loaded back by diffusers and compared (ExportCheckError: nothing is
    written), then moved into place with its model card (`card(folder)` -> README.md text)."""
    model = model.float().cpu().eval()
    model_component(model)  # refuse other architectures before any work
    autoencoder = None
    if extra.get("autoencoder_from"):
        from dkdm_cli.teachers.spec import resolve_teacher

        autoencoder = resolve_teacher(extra["autoencoder_from"], device="cpu").autoencoder
    sampler, eta, top = _run_sampler(extra)
    with _fs.atomic_folder(out) as tmp:
        write_folder(tmp, model, extra=extra, autoencoder=autoencoder, sampler=sampler, eta=eta,
                     top=top)
        result.max_abs_diff = check_folder(tmp, model)
        _fs.write_text(tmp / "README.md", card(tmp))
