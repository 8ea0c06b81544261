"""The configuration's schema: every section of `dkdm.toml` as a typed, frozen dataclass, each
key with its default, its documentation and its bounds (`opt`), and the choices they take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import tomli_w

DEFAULT_CONFIG_NAME = "dkdm.toml"
# Upper bounds that catch typos (10^30 iterations) long before anything runs.
MAX_ITERATIONS = 10**9
MAX_BATCH = 1 << 20
MAX_IMAGES = 10**7
SAMPLERS = ("iddpm", "ddim", "dpm-solver++", "unipc", "consistency")  # samplers.Sampler's values
# "auto": the sampler a model was made for (a few-step student's consistency sampling), else iddpm
SAMPLER_CHOICES = ("auto", *SAMPLERS)
# Classifier-free guidance: useful scales are ~1-10 (DiT samples at 1.5-4); far above that every
# sample saturates to black and white, so a larger --cfg is a typo, not a setting.
MAX_GUIDANCE = 50.0
GUIDANCE_HINT = "useful guidance scales are about 1 to 10; larger ones saturate every image"


class Choice(str, Enum):
    """A set of named choices: the value is what TOML and the command line spell, `help` what
    the choice does. Config fields, CLI help and the `dkdm init` template derive from these."""

    def __new__(cls, value: str, help: str = ""):
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.help = help
        return obj

    def __str__(self) -> str:
        return self.value

    @classmethod
    def spelled(cls) -> str:
        """'a | b | c'."""
        return " | ".join(m.value for m in cls)

    @classmethod
    def described(cls) -> str:
        """'a (what a does) | b (...)'."""
        return " | ".join(f"{m.value} ({m.help})" if m.help else m.value for m in cls)


class Mode(Choice):
    """Where each iteration's training batch comes from (docs/method.md)."""

    BASIC = ("basic", "one batch of chain states, all started from noise")
    SHUFFLE = ("shuffle", "one batch of states at shuffled start steps")
    DYNAMIC = ("dynamic", "DKDM: a pool of ceil(rho*T*b) states, b drawn per iteration")
    SYNTHETIC = ("synthetic", "data-free baseline: L_hybrid on pre-generated teacher samples")
    DATA = ("data", "data-driven reference, NOT data-free: L_hybrid on real images")

    @property
    def uses_pool(self) -> bool:
        """Whether the batches are chain states of a pool (the DKDM modes)."""
        return self in (Mode.BASIC, Mode.SHUFFLE, Mode.DYNAMIC)


class Objective(Choice):
    """What the student learns from each teacher step on the pool."""

    DKDM = ("dkdm", "the teacher's denoiser: eps (and variance) at every step, for 50-step sampling")
    CONSISTENCY = ("consistency", "a few-step student: consistency distillation against the "
                   "teacher's ODE neighbour, sampled in 1-8 steps")


class Init(Choice):
    """How the pool's states reach their shuffled start steps."""

    EXACT = ("exact", "one ancestral chain per state, the paper's; ~N*T/2 teacher steps")
    FAST = ("fast", "DPM-Solver++(2M) on the probability-flow ODE, steps of one size; "
            "~N*k/2 teacher steps, on the chain's marginals within ~1-2 %")


class Precision(Choice):
    """Arithmetic of the student's forward pass (its weights and optimizer stay float32)."""

    AUTO = ("auto", "bf16 autocast on a CUDA device that supports it, fp32 elsewhere")
    FP32 = ("fp32", "")
    BF16 = ("bf16", "bf16 autocast")


class NetworkPrecision(Choice):
    """The dtype a frozen network (the teacher, or the model `dkdm sample` / `dkdm eval` run)
    is cast to; norm layers of dkdm's UNet and DiT keep float32 parameters."""

    AUTO = ("auto", "bf16 on a CUDA device that supports it, fp32 elsewhere")
    FP32 = ("fp32", "")
    BF16 = ("bf16", "")
    FP16 = ("fp16", "")


class Compile(Choice):
    """Whether the networks are compiled with torch.compile (the maths is the same)."""

    AUTO = ("auto", "on for CUDA devices, off elsewhere (a CPU run rarely repays the compile time)")
    ON = ("on", "")
    OFF = ("off", "")

    @classmethod
    def from_bool(cls, value: bool) -> Compile:
        """`compile = true / false`, as earlier versions wrote it."""
        return cls.ON if value else cls.OFF


def opt(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, gt: float | None = None, auto: bool = False,
        hint: str = "") -> Any:
    """A config field with its documentation and validation rules (`auto`: the string "auto" is
    also accepted; `hint`: what a value out of range should be). An Enum default brings its own
    choices."""
    if isinstance(default, Choice):
        choices = tuple(type(default))
    meta = {"doc": doc, "min": min, "max": max, "choices": choices, "gt": gt, "auto": auto,
            "hint": hint}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TeacherConfig:
    """[teacher]: which pretrained model to learn from."""

    name: str = opt("digits", "teacher spec: a registered name, hf:ORG/NAME[@REV], a path, or "
                    "py:FILE.py:FUNCTION (your own model, docs/bring-your-own-teacher.md)")
    arch: str = opt("", "architecture preset for improved/guided-diffusion .pt checkpoints")
    arch_kwargs: dict = opt({}, "architecture flags for .pt checkpoints (num_channels, ...)")


@dataclass(frozen=True)
class StudentConfig:
    """[student]: the architecture to train."""

    name: str = opt("unet-n", "student preset from `dkdm students`")
    kwargs: dict = opt({}, "overrides of the preset's arguments, e.g. {model_channels = 16}")
    init: str = opt("", "start from these weights instead of random ones: a dkdm run directory "
                    "(its EMA weights) or model file of the same preset and shape ('': random)")


@dataclass(frozen=True)
class DistillConfig:
    """[distill]: the DKDM training run."""

    mode: Mode = opt(Mode.DYNAMIC, f"where batches come from: {Mode.described()}")
    objective: Objective = opt(Objective.DKDM, f"what the student learns: {Objective.described()}")
    consistency_k: int = opt(20, "consistency objective: the teacher's ODE neighbour is k steps "
                             "below each state (T/50 for T = 1000, as LCM)", min=1)
    consistency_target_ema: float = opt(0.95, "consistency objective: EMA rate of the target "
                                        "network (the student's EMA, ema_rate, is sampled)",
                                        min=0, max=0.9999)
    iterations: int = opt(1500, "total training iterations (resuming continues up to this)", min=1,
                          max=MAX_ITERATIONS)
    batch_size: int = opt(64, "states per iteration, b", min=1, max=MAX_BATCH)
    rho: float = opt(0.1, "pool size factor: N = ceil(rho * T * b) in dynamic mode (paper: 0.4)",
                     gt=0)
    init: Init = opt(Init.FAST, f"pool start-up: {Init.described()}")
    init_steps: int = opt(48, "fast start-up: k; a state starting at t takes "
                          "ceil(k*(T-1-t)/(T-1)) teacher steps", min=1)
    init_batch_size: int = opt(256, "teacher batch size during pool start-up", min=1)
    pool_from: str = opt("", "start the pool from this dkdm run directory's saved pool (same "
                         "teacher and pool size) instead of a start-up; `--few-step RUN` sets it")
    vlb_lambda: float = opt(0.001, "lambda of L_vlb* (weight of the per-t KL = lambda * T)", min=0)
    lr: float = opt(4e-4, "AdamW learning rate, constant after warm-up (paper: 1e-4)", gt=0)
    warmup: int = opt(100, "linear learning-rate warm-up iterations", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 disables)", min=0)
    ema_rate: float = opt(0.999, "EMA decay of the student's weights (paper: 0.9999)", min=0, max=1)
    ema_warmup: bool = opt(True, "ramp the EMA decay as min(rate, (1+n)/(10+n))")
    seed: int = opt(0, "random seed (each rank adds its rank)", min=0)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: Precision = opt(Precision.AUTO, f"student arithmetic: {Precision.described()}")
    teacher_precision: NetworkPrecision = opt(
        NetworkPrecision.AUTO, f"teacher dtype: {NetworkPrecision.described()}")
    compile: Compile = opt(Compile.AUTO, "torch.compile the student and the teacher network: "
                           f"{Compile.described()}")
    run_dir: str = opt("", "run directory (default runs/<teacher>-<student>)")
    save_every: int = opt(500, "checkpoint every N iterations (and at the end)", min=1)
    keep_last: int = opt(3, "checkpoints to keep", min=1)
    save_pool: bool = opt(True, "store the state pool in checkpoints (exact resume)")
    log_every: int = opt(50, "log metrics every N iterations", min=1)
    grid_every: int = opt(500, "write a fixed-noise sample grid every N iterations (0: never)",
                          min=0)
    grid_num: int = opt(16, "images in that grid", min=1)
    grid_steps: int = opt(25, "sampling steps for that grid", min=1)
    tensorboard: bool = opt(False, "also log to TensorBoard (needs the tensorboard package)")
    synthetic_samples: int | str = opt(
        "auto", "synthetic mode: teacher samples to pre-generate; auto: as many as make the "
        "teacher forwards equal those of the dynamic-mode run with these settings", min=1, auto=True)
    synthetic_steps: int = opt(50, "synthetic mode: ancestral sampling steps per teacher sample",
                               min=1)
    data: str = opt("", "data mode: a folder of images or an .npz (arr_0, uint8 N x H x W x C) of "
                    "REAL images at the teacher's size (a reference for studies, not data-free)")
    class_weights: list = opt([], "class-conditional teachers: relative frequency of each class in "
                              "the pool, one number per class ([]: uniform)", min=0)
    cfg_dropout: float = opt(0.1, "class-conditional teachers with a null class: fraction of states "
                             "that carry it, so the student also learns the unconditional branch "
                             "(and supports any --cfg at sampling)", min=0, max=1)
    guidance_scale: float = opt(1.0, "class-conditional teachers with a null class: learn the "
                                "teacher's classifier-free-guided prediction at this scale "
                                "(1: none; costs 2 teacher forwards per state)", min=0,
                                max=MAX_GUIDANCE, hint=GUIDANCE_HINT)


@dataclass(frozen=True)
class SampleConfig:
    """[sample]: generating images."""

    num: int = opt(64, "number of images", min=1, max=MAX_IMAGES)
    steps: int | str = opt("auto", "sampling steps (at most the model's T); auto: the model's own "
                           "(4 for a few-step student), else 50", min=1, auto=True)
    sampler: str = opt("auto", "auto (the model's own: consistency for a few-step student, else "
                       "iddpm) | iddpm (ancestral) | ddim | dpm-solver++ | unipc (diffusers' "
                       "DPM-Solver++(2M) and UniPC, with the model's x0 clipping) | consistency",
                       choices=SAMPLER_CHOICES)
    eta: float = opt(0.0, "DDIM eta (0: deterministic)", min=0)
    seed: int = opt(0, "random seed", min=0)
    batch_size: int = opt(64, "images per forward", min=1)
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: NetworkPrecision = opt(NetworkPrecision.AUTO, "dtype of the sampled network: "
                                      f"{NetworkPrecision.described()}")
    classes: list = opt([], "class-conditional models: the classes to sample, in turn "
                        "([]: uniform over all)", min=0)
    cfg_scale: float = opt(1.0, "class-conditional models with a null class: classifier-free "
                           "guidance scale (1: none; at most 50)", min=0, max=MAX_GUIDANCE,
                           hint=GUIDANCE_HINT)


@dataclass(frozen=True)
class EvalConfig:
    """[eval]: scoring samples."""

    num: int = opt(1000, "samples to generate when scoring a run", min=2, max=MAX_IMAGES)
    steps: int | str = opt("auto", "sampling steps (at most the model's T); auto: the model's own "
                           "(4 for a few-step student), else 50", min=1, auto=True)
    sampler: str = opt("auto", "the students' sampler: auto (the model's own) | iddpm | ddim | "
                       "dpm-solver++ | unipc | consistency; the teacher reference uses the same, "
                       "or iddpm at 50 steps beside a few-step student", choices=SAMPLER_CHOICES)
    seed: int = opt(0, "random seed", min=0)
    batch_size: int = opt(64, "images per forward", min=1)
    reference: str = opt("teacher", "teacher | a folder of images | a statistics .npz")
    inception_weights: str = opt("", "Inception weights file for offline use")
    allow_unknown_inception: bool = opt(False, "accept Inception weights whose sha256 is not "
                                        "torch-fidelity's (their scores compare with no others)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    precision: NetworkPrecision = opt(NetworkPrecision.AUTO, "dtype of the sampled networks "
                                      f"(model and teacher reference): {NetworkPrecision.described()}")
    classes: list = opt([], "class-conditional models: score only these classes (the samples "
                        "and the teacher reference), in turn ([]: uniform over all)", min=0)
    cfg_scale: float = opt(1.0, "class-conditional models with a null class: classifier-free "
                           "guidance scale for the samples and the teacher reference (at most "
                           "50)", min=0, max=MAX_GUIDANCE, hint=GUIDANCE_HINT)


@dataclass(frozen=True)
class ExportConfig:
    """[export]: shipping a student."""

    format: str = opt("safetensors", "safetensors (a dkdm model file) | onnx (the denoiser) | "
                      "diffusers (a pipeline folder)", choices=("safetensors", "onnx", "diffusers"))
    ema: bool = opt(True, "export the EMA weights")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML."""
        return tomli_w.dumps(self.to_dict())

    def save(self, path: Path, *, notes: list[str] | None = None) -> None:
        """Write the resolved configuration as TOML (atomically), with `notes` as comment lines
        at the end (the file stays a loadable config)."""
        from dkdm_cli import _fs

        tail = "".join(f"# {line}\n" for line in notes or ())
        _fs.write_text(Path(path), self.to_toml() + ("\n" + tail if tail else ""))


_SECTION_TYPES = {"teacher": TeacherConfig, "student": StudentConfig, "distill": DistillConfig,
                  "sample": SampleConfig, "eval": EvalConfig, "export": ExportConfig}
