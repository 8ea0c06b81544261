"""The execution policy: which dtypes the networks run in and whether they are compiled, decided
ONCE at the boundary (from the settings and what the device supports) and only read afterwards.

Nothing else in dkdm asks which device it runs on to choose its arithmetic: the engine, `dkdm
sample` and `dkdm eval` read a `Policy`, so a GPU run executes the code that the CPU tests run
under the same policy (tests run every policy on the CPU; bf16 and fp16 kernels exist there for
every layer our teachers use).

What a policy fixes:
- frozen networks (the teacher in `distill`; the sampled model and the teacher reference in
  `sample` / `eval`) are cast to `network` (`cast_network`): parameters and activations in that
  dtype, but modules that set `keep_float32` (the norm layers of dkdm's UNet and DiT) keep
  float32 parameters and normalise in the activation dtype with float32 accumulation;
- the trained student keeps float32 weights and optimizer state; its forward runs under
  autocast to `student` (None: plain float32);
- the diffusion maths (reverse steps, the loss, the pool) is float32 whatever the networks
  run in: a network's output is read back as float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dkdm_cli.config import Compile, NetworkPrecision, Precision
from dkdm_cli.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {v: k for k, v in DTYPES.items()}


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has bf16 kernels worth using (every CPU has them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu"


def _auto_dtype(device: torch.device) -> torch.dtype:
    # The issue-19 rule: bf16 on a CUDA device that supports it, float32 anywhere else (CPU bf16
    # kernels exist but are slower than float32 on most CPUs).
    return torch.bfloat16 if device.type == "cuda" and bf16_supported(device) else torch.float32


def _check_supported(dtype: torch.dtype, device: torch.device, what: str) -> None:
    if dtype is torch.bfloat16 and not bf16_supported(device):
        raise ConfigError(f"{what} = \"bf16\": {device} has no bf16 support; use fp16 or fp32")


@dataclass(frozen=True)
class Policy:
    """How networks run on `device`. Build it with `distill_policy` or `sampling_policy`."""

    device: torch.device
    network: torch.dtype  # frozen networks: parameters and activations
    student: torch.dtype | None = None  # the trained student's autocast dtype; None = float32
    compile: bool = False
    training: bool = False  # a distillation policy (it also says how the student runs)
    tf32: bool = True
    # Checkpoints written by a background thread: where the loop runs on an accelerator, the
    # CPU is free to write; on the CPU the writer only takes cores from the loop (measured:
    # docs/benchmarks.md, "Checkpoint stall"), so the write stays in the loop there.
    background_saves: bool = False  # float32 matmuls/convolutions on CUDA may use TF32 (no effect elsewhere)

    def autocast(self):
        """The student's autocast context (a no-op context under float32)."""
        if self.student is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.student)

    def apply_backend_flags(self) -> None:
        """Process-wide kernel choices of this policy: TF32 for the float32 leftovers and
        cuDNN's autotuner. Both flags only concern CUDA kernels; CPU maths is unchanged."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = True

    def describe(self) -> dict[str, str | bool]:
        """What ran, for banners, config.resolved.toml and checkpoints."""
        out: dict[str, str | bool] = {
            "device": str(self.device),
            "network": NAMES[self.network] + (" (dkdm's norm layers float32)"
                                              if self.network is not torch.float32 else ""),
            "compile": self.compile,
        }
        if self.device.type == "cuda":
            out["tf32"] = self.tf32
        if self.training:
            out["student"] = "fp32" if self.student is None else f"{NAMES[self.student]} autocast"
        return out


def _network_dtype(setting: NetworkPrecision, device: torch.device, what: str) -> torch.dtype:
    setting = NetworkPrecision(setting)
    dtype = _auto_dtype(device) if setting is NetworkPrecision.AUTO else DTYPES[setting.value]
    _check_supported(dtype, device, what)
    return dtype


def _compile(setting: Compile, device: torch.device) -> bool:
    setting = Compile(setting)
    if setting is Compile.AUTO:
        # Measured on 2 CPU cores: a cold inductor compile costs minutes, more than a CPU demo
        # run gains from it (docs/benchmarks.md); on CUDA it pays back within the first minutes.
        return device.type == "cuda"
    return setting is Compile.ON


def distill_policy(d, device: torch.device) -> Policy:
    """The policy of a distillation run from its [distill] settings."""
    student = Precision(d.precision)
    if student is Precision.AUTO:
        autocast = _auto_dtype(device)
    else:
        autocast = DTYPES[student.value]
        _check_supported(autocast, device, "distill.precision")
    # TF32 for the float32 leftovers, unless the user asked for float32 everywhere: then fp32
    # means IEEE float32 in every kernel.
    strict = student is Precision.FP32 and NetworkPrecision(d.teacher_precision) is NetworkPrecision.FP32
    return Policy(device=device,
                  network=_network_dtype(d.teacher_precision, device, "distill.teacher_precision"),
                  student=None if autocast is torch.float32 else autocast,
                  compile=_compile(d.compile, device), training=True, tf32=not strict,
                  background_saves=device.type != "cpu")


def sampling_policy(precision: NetworkPrecision, device: torch.device, *,
                    what: str = "sample.precision") -> Policy:
    """The policy of `dkdm sample` / `dkdm eval`: the sampled networks' dtype."""
    return Policy(device=device, network=_network_dtype(precision, device, what))


def cast_network(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast a frozen network's floating parameters and buffers to `dtype`, except in modules
    that set `keep_float32` (our norm layers), which keep float32 parameters. In place."""
    module.to(dtype=dtype)
    if dtype is not torch.float32:
        for m in module.modules():
            if getattr(m, "keep_float32", False):
                m.to(dtype=torch.float32)
    return module


def activation_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a network computes in: that of its first floating parameter outside the
    float32-kept modules (float32 for a network without parameters)."""
    kept = {id(p) for m in module.modules() if getattr(m, "keep_float32", False)
            for p in m.parameters(recurse=False)}
    for p in module.parameters():
        if p.is_floating_point() and id(p) not in kept:
            return p.dtype
    return torch.float32


def compile_options() -> dict[str, object]:
    """torch.compile's options for dkdm's networks: fixed shapes (the loop's batch never
    changes), inductor unless DKDM_COMPILE_BACKEND names another backend (e.g. aot_eager, which
    compiles in seconds: the tests and `gpu_check.sh --smoke` use it on the CPU)."""
    import os

    return {"backend": os.environ.get("DKDM_COMPILE_BACKEND", "inductor"), "dynamic": False}
