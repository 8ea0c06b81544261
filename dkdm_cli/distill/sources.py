"""Where each iteration's batch comes from: one small object per kind of mode.

PoolSource     basic, shuffle, dynamic (DKDM): chain states of the teacher; ONE teacher forward
               per iteration gives the loss target and the states' next step.
ImageSource    synthetic (teacher samples generated once, the data-free baseline) and data (real
               images, the data-driven reference): clean x_0 noised by q(x_t | x_0), trained with
               improved-diffusion's L_hybrid.

Each yields a `Batch`: the student's inputs (with class labels for a conditional teacher) and the
function from the student's output to the loss, so the training iteration has no branch on the
mode. Each also counts teacher forwards
(one per image per teacher evaluation): those of its start-up and those per iteration.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dkdm_cli.config import DistillConfig, Init, Mode
from dkdm_cli.diffusion.gaussian import GaussianDiffusion
from dkdm_cli.diffusion.guidance import guided
from dkdm_cli.distill.objective import LossTerms, dkdm_loss, hybrid_loss
from dkdm_cli.distill.pool import (
    LabelPlan,
    StatePool,
    StepResult,
    TeacherFn,
    expected_init_steps,
    pool_size,
    teacher_step,
)


@dataclass
class Batch:
    """The student's inputs and how its output is scored."""

    x: torch.Tensor  # (B, C, H, W) x_t
    t: torch.Tensor  # (B,) steps 0..T-1
    loss: Callable[[torch.Tensor], LossTerms]  # student output (B, C or 2C, H, W) -> terms
    y: torch.Tensor | None = None  # (B,) class labels (conditional teachers), null class included


class PoolSource:
    """Chain states of the teacher (the DKDM modes)."""

    def __init__(self, pool: StatePool, *, teacher_fn: TeacherFn, diffusion: GaussianDiffusion,
                 batch_size: int, clip_denoised: bool, lam: float, startup_forwards: int,
                 forwards_per_state: int = 1, objective: Objective | None = None) -> None:
        self.pool, self.teacher_fn, self.diffusion = pool, teacher_fn, diffusion
        self.batch_size, self.clip, self.lam = batch_size, clip_denoised, lam
        self.startup_forwards = startup_forwards
        self.forwards_per_iteration = batch_size * forwards_per_state  # 2 with guidance
        self.objective = objective or dkdm_objective(diffusion, lam=lam, clip=clip_denoised)

    def next(self) -> Batch:
        """Draw b states, take ONE teacher step on them, write the new states back."""
        pool = self.pool
        idx = pool.draw(self.batch_size)
        x, t = pool.x[idx], pool.t[idx]  # (b, C, H, W), (b,)
        y = pool.y[idx] if pool.y is not None else None  # (b,)
        res = teacher_step(self.teacher_fn, self.diffusion, x=x, t=t, noise=pool.randn(x.shape),
                           clip_denoised=self.clip, y=y)
        pool.write_back(idx, res.x_next, t)
        return Batch(x, t, self.objective(res, x, t, y), y)

    def tensors(self, *, save_data: bool) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: the pool's RNG stream, and the pool itself (with its labels) when
        `save_data`."""
        out = {"rng/pool": self.pool.generator.get_state()}
        if save_data:
            out["pool/x"], out["pool/t"] = self.pool.x, self.pool.t
            if self.pool.y is not None:
                out["pool/y"] = self.pool.y
        return out


# (the teacher's step on the batch, x_t, t, labels) -> the loss as a function of the student's
# output: the DKDM objective below, or the few-step one (distill/consistency.py).
Objective = Callable[[StepResult, torch.Tensor, torch.Tensor, "torch.Tensor | None"],
                     Callable[[torch.Tensor], LossTerms]]


def dkdm_objective(diffusion: GaussianDiffusion, *, lam: float, clip: bool) -> Objective:
    """The DKDM objective (objective.dkdm_loss), reusing the teacher step's reverse-step maths."""

    def objective(res: StepResult, x: torch.Tensor, t: torch.Tensor, y) -> Callable:
        return lambda out: dkdm_loss(diffusion, teacher_out=res.teacher_out, student_out=out,
                                     x_t=x, t=t, lam=lam, clip_denoised=clip, teacher_step=res.step)

    return objective


class ImageSource:
    """Clean images x_0 (N, C, H, W) in the diffusion space, noised afresh every iteration."""

    def __init__(self, x0: torch.Tensor, generator: torch.Generator, *, diffusion: GaussianDiffusion,
                 batch_size: int, lam: float, startup_forwards: int, stored: bool) -> None:
        self.x0, self.generator, self.diffusion = x0, generator, diffusion
        self.batch_size, self.lam = batch_size, lam
        self.startup_forwards = startup_forwards
        self.forwards_per_iteration = 0
        self.stored = stored  # teacher samples are kept in checkpoints; real data stays on disk

    def next(self) -> Batch:
        """b images drawn with replacement, t uniform, x_t ~ q(x_t | x_0)."""
        gen, dev, b = self.generator, self.x0.device, self.batch_size
        idx = torch.randint(0, len(self.x0), (b,), generator=gen, device=dev)
        x0 = self.x0[idx]  # (b, C, H, W)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), generator=gen, device=dev)
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        x_t = self.diffusion.q_sample(x0, t, noise)
        loss = functools.partial(_hybrid_terms, self.diffusion, x0, x_t, t, noise, self.lam)
        return Batch(x_t, t, loss)

    def tensors(self, *, save_data: bool) -> dict[str, torch.Tensor]:
        """Checkpoint tensors: the batch RNG stream, and the teacher samples when `save_data`."""
        out = {"rng/data": self.generator.get_state()}
        if save_data and self.stored:
            out["synthetic/x"] = self.x0
        return out


def _hybrid_terms(diffusion, x0, x_t, t, noise, lam, student_out) -> LossTerms:
    return hybrid_loss(diffusion, model_out=student_out, x0=x0, x_t=x_t, t=t, noise=noise, lam=lam)


# -- teacher compute ----------------------------------------------------------------------------

def dkdm_forwards(d: DistillConfig, num_timesteps: int) -> int:
    """Teacher forwards of a dynamic-mode run with these settings: start-up + iterations * b."""
    size = pool_size(mode=Mode.DYNAMIC, rho=d.rho, num_timesteps=num_timesteps,
                     batch_size=d.batch_size)
    startup = expected_init_steps(size=size, num_timesteps=num_timesteps, init=d.init,
                                  init_steps=d.init_steps, mode=Mode.DYNAMIC)
    return startup + d.iterations * d.batch_size


def synthetic_plan(d: DistillConfig, num_timesteps: int) -> dict[str, Any]:
    """How many teacher samples the synthetic baseline generates, at how many steps each.

    `synthetic_samples = "auto"`: as many as make the generation's teacher forwards equal those
    of the DKDM (dynamic-mode) run with the same settings, so the two are compared at equal
    teacher compute; the last sample's steps are not split, so the match is within `steps`."""
    steps = d.synthetic_steps
    if d.synthetic_samples == "auto":
        target = dkdm_forwards(d, num_timesteps)
        num = max(1, math.floor(target / steps + 0.5))
        return {"samples": num, "steps": steps, "matched_to": "dynamic", "target_forwards": target,
                "teacher_forwards": num * steps}
    num = int(d.synthetic_samples)
    return {"samples": num, "steps": steps, "teacher_forwards": num * steps}


# -- building a source (start-up), or restoring it from a checkpoint ----------------------------

@dataclass
class Built:
    """A source, whether it came from the checkpoint, and what its start-up cost (fresh only)."""

    source: PoolSource | ImageSource
    restored: bool
    startup: dict[str, Any] | None = None


def build_source(d: DistillConfig, *, teacher, device: torch.device, seed: int, ckpt,
                 distributed: bool, obs, loop_teacher=None, objective: Objective | None = None
                 ) -> Built:
    """The batch source of `d.mode`: restored from `ckpt` where it holds it, else started up
    (progress through `obs.phase` / `obs.advance`). `loop_teacher`: the same teacher for the
    loop's forwards (e.g. compiled), when it differs from the start-up's."""
    mode = Mode(d.mode)
    resumed_step = ckpt.step if ckpt is not None else 0
    gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + resumed_step)
    startup_forwards = int(ckpt.doc.get("startup_teacher_forwards", 0)) if ckpt is not None else 0
    if mode.uses_pool:
        return _pool_source(d, mode, teacher=teacher, device=device, gen=gen, ckpt=ckpt,
                            distributed=distributed, obs=obs, startup_forwards=startup_forwards,
                            loop_teacher=loop_teacher or teacher, objective=objective)
    x0, restored, startup = None, False, None
    if mode is Mode.SYNTHETIC and ckpt is not None and "synthetic/x" in ckpt.tensors:
        x0, restored = ckpt.tensors["synthetic/x"].to(device), True
    elif mode is Mode.SYNTHETIC:
        x0, startup = _generate_synthetic(d, teacher=teacher, device=device, seed=seed, obs=obs)
        startup_forwards = startup["teacher_forwards"]
    else:
        from dkdm_cli.distill.realdata import load_images

        x0 = load_images(d.data, tuple(teacher.sample_shape)).to(device)
        restored = ckpt is not None and "rng/data" in ckpt.tensors
        startup = {"mode": mode.value, "data": d.data, "images": len(x0), "teacher_forwards": 0}
    if ckpt is not None and "rng/data" in ckpt.tensors and (restored or mode is Mode.DATA):
        gen.set_state(ckpt.tensors["rng/data"])
    source = ImageSource(x0, gen, diffusion=teacher.diffusion, batch_size=d.batch_size,
                         lam=d.vlb_lambda, startup_forwards=startup_forwards,
                         stored=mode is Mode.SYNTHETIC)
    return Built(source, restored, startup if ckpt is None else None)


def label_plan(d: DistillConfig, teacher) -> LabelPlan | None:
    """How the pool labels its states for this teacher (None: an unconditional teacher)."""
    if not teacher.conditional:
        return None
    weights = tuple(d.class_weights) or (1.0,) * teacher.num_classes
    return LabelPlan(weights=weights, null_class=teacher.null_class,
                     null_prob=d.cfg_dropout if teacher.null_class is not None else 0.0)


def teacher_function(d: DistillConfig, teacher) -> tuple[TeacherFn, int]:
    """(the function the pool steps states with, teacher forwards per state): the teacher's own
    output, or with `guidance_scale` != 1 its classifier-free-guided output (one batched forward
    of 2 per state, conditional and null label)."""
    if not teacher.conditional or d.guidance_scale == 1.0:
        return teacher.model_output, 1
    channels = teacher.sample_shape[0]

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return guided(teacher.model_output, y=y, null_class=teacher.null_class,
                      scale=d.guidance_scale, channels=channels)(x, t)

    return fn, 2


def _pool_source(d: DistillConfig, mode: Mode, *, teacher, device, gen, ckpt, distributed, obs,
                 startup_forwards: int, loop_teacher, objective: Objective | None) -> Built:
    from dkdm_cli.distill.pool import init_pool
    from dkdm_cli.distill.state import pool_from_checkpoint

    T = teacher.diffusion.num_timesteps
    clip = teacher.settings.clip_denoised
    size = pool_size(mode=mode, rho=d.rho, num_timesteps=T, batch_size=d.batch_size)
    teacher_fn, per_state = teacher_function(d, teacher)
    labels = label_plan(d, teacher)
    kw = dict(teacher_fn=teacher_function(d, loop_teacher)[0], diffusion=teacher.diffusion,
              batch_size=d.batch_size,
              clip_denoised=clip, lam=d.vlb_lambda, forwards_per_state=per_state,
              objective=objective)
    if ckpt is not None and not distributed:
        pool = pool_from_checkpoint(ckpt, num_timesteps=T, size=size, device=device, generator=gen,
                                    labels=labels)
        if pool is not None:
            return Built(PoolSource(pool, startup_forwards=startup_forwards, **kw), True)
    if ckpt is None and d.pool_from and not distributed:
        return _saved_pool_source(d, mode, teacher=teacher, device=device, gen=gen,
                                  labels=labels, size=size, kw=kw)
    init = Init(d.init)
    total = expected_init_steps(size=size, num_timesteps=T, init=init, init_steps=d.init_steps,
                                mode=mode)
    obs.phase(f"start-up ({init.value}) teacher steps", total=max(total, 1))
    start = time.perf_counter()
    pool = init_pool(size=size, shape=tuple(teacher.sample_shape), diffusion=teacher.diffusion,
                     teacher_fn=teacher_fn, mode=mode, init=init,
                     init_steps=d.init_steps, chunk=d.init_batch_size, clip_denoised=clip,
                     device=device, generator=gen, tick=obs.advance, labels=labels)
    forwards = pool.teacher_sample_steps * per_state
    startup = {"mode": mode.value, "pool_size": len(pool), "pool_bytes": pool.nbytes,
               "init": init.value if mode is not Mode.BASIC else "none",
               **({"pool_from": "not used: one pool per process when distributed"}
                  if d.pool_from else {}),
               "teacher_forwards": forwards, "seconds": round(time.perf_counter() - start, 3)}
    if labels is not None:
        startup["labels"] = {"classes": teacher.num_classes, "null_class": labels.null_class,
                             "null_fraction": float((pool.y == labels.null_class).float().mean())
                             if labels.null_class is not None else 0.0,
                             "guidance_scale": d.guidance_scale}
    source = PoolSource(pool, startup_forwards=forwards, **kw)
    return Built(source, False, startup if ckpt is None else None)


def _saved_pool_source(d: DistillConfig, mode: Mode, *, teacher, device, gen, labels, size: int,
                       kw: dict) -> Built:
    """The pool of `d.pool_from`'s latest checkpoint (checked by warmstart.saved_pool) instead of
    a start-up: its states already lie on the teacher's chains, so no teacher forward is spent.
    The pool's random stream is this run's own (from its seed), not the other run's."""
    from dkdm_cli.checkpoint import load_latest
    from dkdm_cli.distill.state import pool_from_checkpoint

    start = time.perf_counter()
    ckpt = load_latest(Path(d.pool_from))
    own_stream = gen.get_state()
    pool = pool_from_checkpoint(ckpt, num_timesteps=teacher.diffusion.num_timesteps, size=size,
                                device=device, generator=gen, labels=labels)
    gen.set_state(own_stream)
    startup = {"mode": mode.value, "pool_size": len(pool), "pool_bytes": pool.nbytes,
               "init": "saved", "pool_from": str(ckpt.path), "teacher_forwards": 0,
               "seconds": round(time.perf_counter() - start, 3)}
    return Built(PoolSource(pool, startup_forwards=0, **kw), False, startup)


def _generate_synthetic(d: DistillConfig, *, teacher, device, seed: int, obs):
    """(x_0 (M, C, H, W), start-up record): M teacher samples by ancestral sampling."""
    from dkdm_cli.diffusion.samplers import Sampler, sample
    from dkdm_cli.sample import initial_noise

    plan = synthetic_plan(d, teacher.diffusion.num_timesteps)
    num, steps = plan["samples"], plan["steps"]
    obs.phase("synthetic teacher samples", total=num)
    start = time.perf_counter()
    noise = initial_noise(num, tuple(teacher.sample_shape), seed=seed)  # (M, C, H, W)
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    out = []
    for i in range(0, num, d.init_batch_size):
        x = sample(teacher.denoise, teacher.diffusion, noise=noise[i:i + d.init_batch_size].to(device),
                   steps=steps, sampler=Sampler.IDDPM, clip_denoised=teacher.settings.clip_denoised,
                   generator=gen, on_step=lambda _done, _n: obs.advance(0))  # a tick per step
        out.append(x)
        obs.advance(len(x))
    startup = {"mode": Mode.SYNTHETIC.value, **plan, "seconds": round(time.perf_counter() - start, 3)}
    return torch.cat(out), startup
