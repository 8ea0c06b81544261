"""Your own diffusion model as a teacher: `dkdm_cli.api.denoiser(model, ...)` wraps any
nn.Module with its noise process, and `py:FILE.py:FUNCTION` / `py:package.module:FUNCTION`
names a function that returns one.

Loading a `py:` teacher RUNS your code: the file is imported (as `python FILE.py` would run it,
with its folder first on sys.path while it loads) and FUNCTION() is called with no arguments.
Use it only with code you trust, as with any Python you run. It is not a data file: dkdm still
reads no pickled data anywhere.

Whatever FUNCTION returns is checked before anything uses it: a Denoiser from api.denoiser,
whose model, on a probe batch, returns a floating, finite tensor of the shape its variance
setting needs. Each problem is one line naming what is wrong (TeacherError, exit 2).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli.diffusion.gaussian import Prediction, VarianceType
from dkdm_cli.diffusion.schedules import SCHEDULES
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.errors import ConfigError, TeacherError, UserError
from dkdm_cli.precision import activation_dtype
from dkdm_cli.teachers.base import Denoiser

# What api.denoiser accepts -> dkdm's names (diffusers' spellings are accepted too).
PREDICTIONS = {"epsilon": Prediction.EPSILON, "x0": Prediction.SAMPLE, "v": Prediction.V,
               "sample": Prediction.SAMPLE, "v_prediction": Prediction.V}
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
_MODULE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class UserNetwork(nn.Module):
    """Your model behind dkdm's network contract `net(x, t[, y])`, t the integer steps
    0..T-1 mapped by `timesteps` to what your model reads (None: passed as they are)."""

    def __init__(self, model: nn.Module, timesteps: Callable | None) -> None:
        super().__init__()
        self.model = model
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """x (B, C, H, W), t (B,) integer steps[, y (B,) labels] -> your model's raw output."""
        steps = t if self.timesteps is None else self.timesteps(t)
        return self.model(x, steps) if y is None else self.model(x, steps, y)


class FunctionDecoder:
    """A latent teacher's `decode` function as dkdm's Autoencoder (decoding only: the function
    does its own scaling, so dkdm's scale is 1)."""

    scaling_factor = 1.0

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._decode = decode
        self.scale = self  # what Denoiser.space_note describes

    def describe(self) -> str:
        """For banners: who decodes."""
        return "decoded by the teacher's own decode function"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Not available: a decode function has no encoder."""
        raise UserError("this teacher was given a decode function only; it cannot encode images")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> images (B, 3, H', W') in [-1, 1], by your function."""
        return self._decode(latents)


def _shape(sample_shape: Any) -> tuple[int, int, int]:
    ok = (isinstance(sample_shape, Sequence) and len(sample_shape) == 3
          and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_shape))
    if not ok:
        raise TeacherError(f"denoiser(): sample_shape must be (C, H, W), three positive integers; "
                           f"got {sample_shape!r}")
    return tuple(sample_shape)  # type: ignore[return-value]


def _settings(*, num_timesteps, schedule, betas, prediction, variance, clip_denoised
              ) -> DiffusionSettings:
    """The noise process the arguments describe, each argument checked."""
    if schedule is not None and betas is not None:
        raise TeacherError("denoiser(): give schedule or betas, not both")
    if num_timesteps is not None and (isinstance(num_timesteps, bool) or
                                      not isinstance(num_timesteps, int) or num_timesteps < 1):
        raise TeacherError(f"denoiser(): num_timesteps must be a positive integer, got {num_timesteps!r}")
    if betas is not None:
        try:
            betas = tuple(float(b) for b in betas)
        except (TypeError, ValueError):
            raise TeacherError(f"denoiser(): betas must be a list of numbers, got {betas!r}"[:200]) from None
        if num_timesteps is not None and num_timesteps != len(betas):
            raise TeacherError(f"denoiser(): {len(betas)} betas for num_timesteps = {num_timesteps}")
        schedule, num_timesteps = "explicit", len(betas)
    schedule = schedule or "linear"
    if schedule != "explicit" and schedule not in SCHEDULES:
        raise TeacherError(f"denoiser(): schedule {schedule!r}: expected one of "
                           f"{', '.join(SCHEDULES)}, or betas=[...]")
    if prediction not in PREDICTIONS:
        raise TeacherError(f"denoiser(): prediction {prediction!r}: expected epsilon, x0 or v")
    if variance not in VARIANCES:
        raise TeacherError(f"denoiser(): variance {variance!r}: expected {', '.join(VARIANCES)}")
    if not isinstance(clip_denoised, bool):
        raise TeacherError(f"denoiser(): clip_denoised must be True or False, got {clip_denoised!r}")
    settings = DiffusionSettings(schedule=schedule, num_timesteps=num_timesteps or 1000,
                                 betas=betas, prediction=PREDICTIONS[prediction].value,
                                 variance=variance, clip_denoised=clip_denoised)
    try:
        settings.build()
    except ConfigError as exc:
        raise TeacherError(f"denoiser(): {exc}") from exc
    return settings


def _labels(num_classes: Any, null_class: Any) -> tuple[int, int | None]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise TeacherError(f"denoiser(): num_classes must be an integer >= 0, got {num_classes!r}")
    if null_class is not None and (not num_classes or null_class != num_classes):
        raise TeacherError(f"denoiser(): null_class must be num_classes ({num_classes}), the label "
                           f"after the real classes 0..{num_classes - 1}, or None; got {null_class!r}"
                           if num_classes else "denoiser(): null_class needs num_classes > 0")
    return num_classes, null_class


def build_denoiser(model: Any, *, sample_shape: Any, num_timesteps: int | None = None,
                   schedule: str | None = None, betas: Sequence[float] | None = None,
                   prediction: str = "epsilon", variance: str = "fixed_small",
                   clip_denoised: bool = True, timesteps: Callable | None = None,
                   num_classes: int = 0, null_class: int | None = None,
                   decode: Callable | None = None) -> Denoiser:
    """api.denoiser's implementation: every argument checked, then the model on a probe batch."""
    if not isinstance(model, nn.Module):
        raise TeacherError(f"denoiser(): model must be a torch.nn.Module, got {type(model).__name__}")
    if next(model.parameters(), None) is None:
        raise TeacherError("denoiser(): the model has no parameters; pass the trained network")
    for name, fn in (("timesteps", timesteps), ("decode", decode)):
        if fn is not None and not callable(fn):
            raise TeacherError(f"denoiser(): {name} must be a function or None, got {fn!r}")
    shape = _shape(sample_shape)
    settings = _settings(num_timesteps=num_timesteps, schedule=schedule, betas=betas,
                         prediction=prediction, variance=variance, clip_denoised=clip_denoised)
    classes, null = _labels(num_classes, null_class)
    denoiser = Denoiser(name=type(model).__name__, model=UserNetwork(model, timesteps),
                        settings=settings, sample_shape=shape, source="",
                        autoencoder=FunctionDecoder(decode) if decode is not None else None,
                        info={"format": "python"}, num_classes=classes, null_class=null)
    probe(denoiser)
    return denoiser


def probe(denoiser: Denoiser) -> None:
    """Run the network once on a batch of 2 (steps 0 and T-1): refuse an output that is not a
    floating tensor of (2, C or 2C, H, W), or is not finite, in one line."""
    c, h, w = denoiser.sample_shape
    T = denoiser.settings.num_timesteps
    device = denoiser.device
    x = torch.randn((2, c, h, w), generator=torch.Generator().manual_seed(0)).to(
        device, activation_dtype(denoiser.model))  # (2, C, H, W)
    t = torch.tensor([0, T - 1], device=device)  # (2,)
    y = (torch.tensor([0, denoiser.label_count - 1], device=device),) if denoiser.conditional else ()
    call = f"model(x, t{', y' if y else ''})"
    try:
        with torch.no_grad():
            out = denoiser.model.eval()(x, t, *y)
    except Exception as exc:  # noqa: BLE001  the user's code may raise anything
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TeacherError(f"denoiser(): {call} failed on a probe batch x {tuple(x.shape)}, t "
                           f"[0, {T - 1}]: {type(exc).__name__}: {first}") from exc
    if not torch.is_tensor(out):
        hint = " (a diffusers model: return model(x, t).sample)" if hasattr(out, "sample") else ""
        raise TeacherError(f"denoiser(): {call} returned {type(out).__name__}, expected a tensor "
                           f"(B, C, H, W){hint}")
    learned = VarianceType(denoiser.settings.variance).learned
    allowed = [(2, 2 * c, h, w)] if learned else [(2, c, h, w), (2, 2 * c, h, w)]
    if tuple(out.shape) not in allowed:
        need = " or ".join(str(s) for s in allowed)
        raise TeacherError(f"denoiser(): {call} returned shape {tuple(out.shape)} for x "
                           f"{tuple(x.shape)}; variance {denoiser.settings.variance} needs {need}")
    if not out.is_floating_point():
        raise TeacherError(f"denoiser(): {call} returned {out.dtype}, expected a floating tensor")
    if not bool(torch.isfinite(out).all()):
        raise TeacherError(f"denoiser(): {call} returned NaN or inf on a probe batch (x ~ N(0, 1), "
                           f"t = 0 and {T - 1}); check the weights and the timesteps mapping")


# -- py: specs -------------------------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
    """(FILE.py or package.module, FUNCTION) of `py:TARGET:FUNCTION`."""
    body = spec[3:] if spec.startswith("py:") else spec
    target, sep, function = body.rpartition(":")
    if not sep or not target or not function.isidentifier():
        raise TeacherError(f"{spec}: expected py:FILE.py:FUNCTION or py:package.module:FUNCTION")
    if not target.endswith(".py") and not _MODULE_RE.match(target):
        raise TeacherError(f"{spec}: {target!r} is neither a .py file nor a module name "
                           "(package.module)")
    return target, function


def canonical_spec(spec: str) -> str:
    """The spec with a file made absolute, as runs record it (so a student still finds its
    teacher from another folder)."""
    target, function = parse_spec(spec)
    if target.endswith(".py"):
        target = str(Path(target).expanduser().resolve())
    return f"py:{target}:{function}"


def _import(target: str, spec: str):
    """The module a py: spec names: a file is executed as a fresh module, a module imported."""
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise TeacherError(f"{spec}: no module named {exc.name!r} on sys.path (a file must "
                                   "end in .py)") from exc
            raise TeacherError(f"{spec}: importing {target} failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001  importing runs the user's code
            raise TeacherError(f"{spec}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise TeacherError(f"{spec}: no such file {path}")
    name = f"dkdm_py_teacher_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling-free helpers look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001  importing runs the user's code
        sys.modules.pop(name, None)
        raise TeacherError(f"{spec}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_py_teacher(spec: str, *, device: str = "cpu") -> Denoiser:
    """The teacher FUNCTION() returns for `py:FILE.py:FUNCTION` / `py:package.module:FUNCTION`."""
    target, function = parse_spec(spec)
    folder = str(Path(target).expanduser().resolve().parent) if target.endswith(".py") else None
    if folder is not None:
        sys.path.insert(0, folder)  # as `python FILE.py` would: its folder's modules import
    try:
        module = _import(target, spec)
        fn = getattr(module, function, None)
        if not callable(fn):
            raise TeacherError(f"{spec}: {target} has no function {function!r}")
        try:
            result = fn()
        except TeacherError as exc:
            raise TeacherError(f"{spec}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001  the user's code may raise anything
            raise TeacherError(f"{spec}: {function}() raised {type(exc).__name__}: {exc}") from exc
    finally:
        if folder is not None and folder in sys.path:
            sys.path.remove(folder)
    if not isinstance(result, Denoiser):
        raise TeacherError(f"{spec}: {function}() returned {type(result).__name__}; it must return "
                           "dkdm_cli.api.denoiser(model, sample_shape=..., ...)")
    result.source = canonical_spec(spec)
    result.name = f"{Path(target).stem}:{function}"
    return result.to(device)
