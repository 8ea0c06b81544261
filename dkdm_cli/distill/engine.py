"""The DKDM training loop: `distill(config)`.

Per iteration, in dynamic mode: draw b states from the pool, ONE teacher forward (no grad)
gives the target and x_{t-1}, the student trains on the same (x_t, t), the new states go back.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import _console
from dkdm_cli.checkpoint import Checkpoint, checkpoint_path, prune_checkpoints
from dkdm_cli.config import Config, DistillConfig, Mode, Objective
from dkdm_cli.diffusion.samplers import Sampler, sample
from dkdm_cli.distill import runs
from dkdm_cli.distill.consistency import ConsistencyObjective
from dkdm_cli.distill.distributed import (
    DistInfo,
    any_across,
    barrier,
    init_distributed,
    shutdown,
    sum_across,
)
from dkdm_cli.distill.ema import EMA
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.distill.realdata import open_images
from dkdm_cli.distill.saver import CheckpointWriter
from dkdm_cli.distill.signals import StartupWatch, StopFlag, StoppedDuringStartup
from dkdm_cli.distill.sources import build_source
from dkdm_cli.distill.state import TrainState, student_settings
from dkdm_cli.distill.warmstart import check_init, saved_pool
from dkdm_cli.errors import ConfigError, ShapeMismatchError, TeacherError, TrainingError
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.models.io import load_state_strict
from dkdm_cli.precision import Policy, compile_options, distill_policy
from dkdm_cli.sample import initial_noise, save_grid, to_uint8
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.spec import resolve_teacher


@dataclass
class DistillResult:
    """How a `distill` call ended."""

    run_dir: Path
    step: int
    status: str  # completed | interrupted | already-complete
    seconds: float
    last_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    is_main: bool = True  # False on ranks > 0 of a multi-process job
    exit_code: int = 0  # 130 / 143 when a stop signal ended the run
    signal: str = ""  # the stop signal's name, e.g. SIGTERM
    teacher_forwards: int = 0  # per image, start-up included, over all processes
    num_classes: int = 0  # a class-conditional teacher's classes (0: unconditional)
    null_class: int | None = None
    guidance_scale: float = 1.0  # distilled on the teacher's guided prediction at this scale
    during_startup: bool = False  # stopped before the first iteration: nothing new was saved


def student_label_kwargs(teacher: Teacher) -> dict[str, Any]:
    """The student's label table for this teacher: the same classes, and a null row when the
    teacher has a null class (so the student learns the unconditional branch too)."""
    if not teacher.conditional:
        return {}
    if teacher.null_class not in (None, teacher.num_classes):
        # Students keep the null row after the real classes, where every known teacher has it.
        raise TeacherError(f"{teacher.name}: null class {teacher.null_class} is not after its "
                           f"{teacher.num_classes} classes; such a teacher is not supported")
    return {"num_classes": int(teacher.num_classes), "class_null": teacher.null_class is not None}


def build_student(cfg: Config, teacher: Teacher, device: torch.device) -> nn.Module:
    """The student preset fitted to the teacher's sample shape, variance output and classes."""
    c, h, w = teacher.sample_shape
    if h != w:
        raise ShapeMismatchError(f"teacher samples are {h}x{w}; students need square inputs")
    labels = student_label_kwargs(teacher)
    clash = sorted({"num_classes", "class_null"} & set(cfg.student.kwargs))
    if clash:
        raise ConfigError(f"[student] kwargs {', '.join(clash)}: the student's classes follow the "
                          "teacher's; remove them")
    # On the meta device (validation) nothing is allocated and no random numbers are drawn.
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        student = create_model(cfg.student.name, image_size=h, in_channels=c,
                               learn_sigma=teacher.learn_sigma, **labels, **cfg.student.kwargs)
    student = student.to(device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad():
        probe = student(torch.zeros(1, c, h, w, device=device), zero,
                        *((zero,) if labels else ()))
    want = (2 * c if teacher.learn_sigma else c, h, w)
    if tuple(probe.shape[1:]) != want:
        raise ShapeMismatchError(
            f"student {cfg.student.name} outputs {tuple(probe.shape[1:])}, the teacher needs {want}"
        )
    return student


def _lr_at(cfg: Config, step: int) -> float:
    d = cfg.distill
    return d.lr * min(1.0, (step + 1) / d.warmup) if d.warmup else d.lr


def make_optimizer(model: nn.Module, d: DistillConfig) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step on every device that has the fused kernel (CPU,
    CUDA, ...): the same maths everywhere, and no host read of the step count."""
    fused = all(p.device.type in _FUSED_DEVICES for p in model.parameters())
    return torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=d.weight_decay,
                             fused=fused or None)


try:  # the devices torch's fused AdamW supports (a capability, not a choice of maths)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older torch
    _FUSED_DEVICES = frozenset({"cuda"})


class Distiller:
    """One run: setup, start-up, the loop, checkpoints. Use `distill()` unless embedding."""

    def __init__(self, cfg: Config, *, info: DistInfo, run_dir: Path, teacher: Teacher,
                 observer: Observer, policy: Policy | None = None,
                 writer: CheckpointWriter | None = None) -> None:
        self.cfg, self.info, self.run_dir, self.teacher, self.obs = cfg, info, run_dir, teacher, observer
        d = cfg.distill
        self.device = info.device
        self.policy = policy or distill_policy(d, self.device)
        self.diffusion = teacher.diffusion
        self.seed = d.seed + info.rank
        torch.manual_seed(self.seed)
        student = build_student(cfg, teacher, self.device)
        if cfg.student.init:  # a resumed run's checkpoint then replaces these weights
            load_state_strict(student, check_init(cfg.student.init, student),
                              source=cfg.student.init)
        opt = make_optimizer(student, d)
        self.state = TrainState(student=student, ema=EMA(student, rate=d.ema_rate, warmup=d.ema_warmup),
                                opt=opt)
        self.train_model: nn.Module = student
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.train_model, device_ids=ids)
        if self.policy.compile:
            # Compile OUTSIDE the DDP wrapper: dynamo then splits the graph at DDP's gradient
            # buckets, so each bucket's all-reduce overlaps the rest of the backward pass.
            self.train_model = torch.compile(self.train_model, **compile_options())
        self.writer = writer or CheckpointWriter(background=self.policy.background_saves)
        self.settings = student_settings(teacher.settings)
        self.clip = teacher.settings.clip_denoised
        self.objective = None  # the DKDM objective lives in the pool source; others here
        if d.objective is Objective.CONSISTENCY:
            self.objective = ConsistencyObjective(
                self.diffusion, student, k=d.consistency_k, target_rate=d.consistency_target_ema,
                clip=self.clip, autocast=self.policy.autocast)

    # -- start-up ----------------------------------------------------------------------------

    def prepare_source(self, ckpt: Checkpoint | None, stop: StopFlag | None = None) -> bool:
        """Build the batch source of the mode (pool, teacher samples or real images), from the
        checkpoint where it holds it; returns whether it came from the checkpoint. With `stop`,
        a stop signal raises StoppedDuringStartup at the next teacher step of the start-up."""
        obs = self.obs if stop is None else StartupWatch(self.obs, stop)
        # The loop's teacher forwards go through the compiled network (one fixed batch shape);
        # the start-up, whose batches shrink as states reach their steps, stays eager.
        loop_teacher = self.teacher.compiled(**compile_options()) if self.policy.compile else None
        built = build_source(self.cfg.distill, teacher=self.teacher, device=self.device,
                             seed=self.seed, ckpt=ckpt, distributed=self.info.distributed,
                             obs=obs, loop_teacher=loop_teacher, objective=self.objective)
        self.source, self.startup = built.source, built.startup
        return built.restored

    def teacher_forwards(self) -> int:
        """Teacher forwards (per image) spent so far: start-up plus every iteration's."""
        return self.source.startup_forwards + self.source.forwards_per_iteration * self.state.step

    # -- one iteration -----------------------------------------------------------------------

    def iteration(self, window: MetricWindow) -> torch.Tensor:
        """One training iteration; returns the loss (on the device, not synchronised)."""
        d, st = self.cfg.distill, self.state
        batch = self.source.next()
        for group in st.opt.param_groups:
            group["lr"] = _lr_at(self.cfg, st.step)
        labels = () if batch.y is None else (batch.y,)
        with self.policy.autocast():
            out = self.train_model(batch.x, self.diffusion.model_timesteps(batch.t), *labels)
        terms = batch.loss(out)
        st.opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        if d.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(st.student.parameters(), d.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        st.opt.step()
        st.ema.update(st.student)
        if self.objective is not None:
            self.objective.after_step(st.student)
        st.step += 1
        window.add(loss=terms.loss, mse=terms.mse, kl=terms.kl, per_sample=terms.per_sample,
                   t=batch.t, grad_norm=grad_norm)
        return terms.loss

    # -- outputs -----------------------------------------------------------------------------

    def save(self, *, wait: bool = False) -> Path | None:
        """Checkpoint the current state (main rank), keep the last K. The loop pays for a host
        snapshot; the file is written in the background (distill/saver.py) unless `wait`."""
        d = self.cfg.distill
        path = checkpoint_path(self.run_dir, self.state.step)
        if self.info.is_main:
            save_pool = d.save_pool and not self.info.distributed
            tensors, doc = self.state.to_tensors()
            tensors.update(self.source.tensors(save_data=save_pool))
            if self.objective is not None:
                tensors.update(self.objective.tensors())
            doc["startup_teacher_forwards"] = self.source.startup_forwards
            doc["runtime"] = self.policy.describe()
            doc.update(runs.checkpoint_doc(self.cfg, self.teacher, self.state.student, self.settings))
            self.writer.submit(path, tensors, doc,
                               after=lambda: prune_checkpoints(self.run_dir, d.keep_last))
            if wait:
                self.writer.wait()
        barrier(self.info)
        return path

    @torch.no_grad()
    def write_grid(self) -> None:
        """A fixed-noise grid of EMA-student samples, so the user sees the student improve."""
        if not self.info.is_main:
            return
        d = self.cfg.distill
        noise = initial_noise(d.grid_num, self.teacher.sample_shape, seed=d.seed + 2024).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(d.seed + 2025)
        self.state.ema.copy_buffers(self.state.student)
        shadow = self.state.ema.shadow
        if self.teacher.conditional:  # one class per grid cell, in order: the grid reads by class
            y = (torch.arange(d.grid_num, device=self.device) % self.teacher.num_classes)  # (G,)
            fn = lambda x, t: shadow(x, t, y).float()  # noqa: E731
        else:
            fn = lambda x, t: shadow(x, t).float()  # noqa: E731
        x = sample(fn, self.diffusion, noise=noise,
                   steps=d.grid_steps, sampler=Sampler.IDDPM, clip_denoised=self.clip, generator=gen)
        images = to_uint8(self.teacher.decode(x))
        save_grid(images, self.run_dir / "grids" / f"step-{self.state.step:08d}.png",
                  scale=max(1, 64 // images.shape[1]))

    def _record(self, window: MetricWindow, batch: int) -> dict[str, Any]:
        reduce = (lambda v: sum_across(self.info, v)) if self.info.distributed else None
        summary = window.summary(reduce)
        seconds = max(time.perf_counter() - window.started, 1e-9)
        its = window.iterations / seconds
        return {"step": self.state.step, **summary, "lr": _lr_at(self.cfg, self.state.step - 1),
                "it_per_s": its, "images_per_s": its * batch,
                "teacher_forwards": self.teacher_forwards() * self.info.world_size}

    # -- the loop ----------------------------------------------------------------------------

    def train(self, stop: StopFlag) -> tuple[str, dict[str, Any]]:
        """Iterate until `iterations` (exactly), a stop signal, or a non-finite loss."""
        d = self.cfg.distill
        batch = d.batch_size * self.info.world_size
        window = MetricWindow(self.device, self.diffusion.num_timesteps)
        self.obs.phase("distill", total=d.iterations, completed=self.state.step)
        last: dict[str, Any] = {}
        # Several processes must stop at the same step: they agree at log boundaries (a sync
        # happens there anyway); a single process stops at the next iteration.
        agree = self.info.distributed
        while self.state.step < d.iterations:
            if stop.requested and not agree:
                return "interrupted", last
            self.iteration(window)
            step = self.state.step
            self.obs.advance(1)
            boundary = step % d.log_every == 0 or step == d.iterations
            saving = step % d.save_every == 0 or step == d.iterations
            if boundary or saving:
                record = self._record(window, batch)
                window.reset()
                if not math.isfinite(record["loss"]):
                    raise TrainingError(
                        f"the loss became non-finite by iteration {step}; stopped without saving. "
                        f"The last good checkpoint in {self.run_dir / 'checkpoints'} is kept; try a "
                        "lower --lr or gradient clipping")
                self.obs.log(record)
                last = record
            if saving:
                self.save()
            if d.grid_every and step % d.grid_every == 0:
                self.write_grid()
            if agree and boundary and any_across(self.info, stop.requested):
                return ("interrupted", last) if step < d.iterations else ("completed", last)
        return "completed", last


def check_before_start(cfg: Config, teacher: Teacher) -> None:
    """Everything that can be refused is refused here, before the run directory is touched:
    the student (preset, kwargs, shape against the teacher, built on the meta device) and the
    settings that depend on the teacher."""
    T = teacher.diffusion.num_timesteps
    d = cfg.distill
    student = build_student(cfg, teacher, torch.device("meta"))
    if cfg.student.init:
        check_init(cfg.student.init, student)
    if d.pool_from:
        saved_pool(cfg, teacher)
    check_labels_config(d, teacher)
    if d.grid_every and d.grid_steps > T:
        raise ConfigError(f"distill.grid_steps = {d.grid_steps}: the teacher has T = {T} steps; "
                          f"use at most {T}")
    if d.objective is Objective.CONSISTENCY and not d.mode.uses_pool:
        raise ConfigError(f"distill.objective = consistency learns from the pool's teacher steps; "
                          f"mode {d.mode.value} has none (use dynamic, shuffle or basic)")
    if d.mode is Mode.DATA:
        if teacher.autoencoder is not None:
            raise ConfigError("mode data trains in pixel space; this teacher is latent "
                              "(encoding real images is not supported)")
        open_images(d.data, tuple(teacher.sample_shape))
    if d.mode is Mode.SYNTHETIC and d.synthetic_steps > T:
        raise ConfigError(f"distill.synthetic_steps = {d.synthetic_steps}: the teacher has T = {T} "
                          f"steps; use at most {T}")


def check_labels_config(d: DistillConfig, teacher: Teacher) -> None:
    """The class settings against the teacher: weights per class, guidance only with a null
    class, and only the pool modes for a conditional teacher."""
    if not teacher.conditional:
        if d.class_weights or d.guidance_scale != 1.0:
            raise ConfigError("distill.class_weights / guidance_scale: the teacher is unconditional "
                              "(no classes)")
        return
    if d.mode in (Mode.SYNTHETIC, Mode.DATA):
        raise ConfigError(f"mode {d.mode.value} is not supported for a class-conditional teacher "
                          "yet; use dynamic (or basic/shuffle)")
    if d.class_weights and (len(d.class_weights) != teacher.num_classes or not sum(d.class_weights)):
        raise ConfigError(f"distill.class_weights: expected {teacher.num_classes} numbers (one per "
                          f"class) with a positive sum, got {len(d.class_weights)}")
    if d.guidance_scale != 1.0 and teacher.null_class is None:
        raise ConfigError(f"distill.guidance_scale = {d.guidance_scale:g}: this teacher has no null "
                          "class, so it has no classifier-free guidance; use 1")


def distill(cfg: Config, *, force: bool = False, quiet: bool = False, json_out: bool = False,
            teacher: Teacher | None = None) -> DistillResult:
    """Train `cfg.student` to imitate `cfg.teacher`'s denoising, with no data. Resumes a run
    directory that already has checkpoints; one made with another config is refused unless
    `force`, which moves it aside (never deletes). Nothing in the run directory is written
    before the teacher, the student and every setting have been checked."""
    info = init_distributed(cfg.distill.device)
    start = time.perf_counter()
    opened = None
    try:
        run_dir = runs.resolve_run_dir(cfg)
        runs.check_run_dir_path(run_dir)
        if teacher is None:
            teacher = resolve_teacher(cfg.teacher.name, arch=cfg.teacher.arch,
                                      arch_kwargs=cfg.teacher.arch_kwargs, device=str(info.device))
        check_before_start(cfg, teacher)
        policy = distill_policy(cfg.distill, info.device)  # refuses bf16 where there is none
        # Rank 0 locks, checks and writes the run directory first; the others then only read it.
        if info.is_main:
            opened = runs.open_run_dir(run_dir, cfg, force=force, say=None if quiet or json_out
                                       else _console.info, runtime=policy.describe())
            ckpt = opened.checkpoint
        barrier(info)
        if not info.is_main:
            ckpt = runs.latest_checkpoint(run_dir)
        if ckpt is not None and ckpt.step >= cfg.distill.iterations:
            return DistillResult(run_dir, ckpt.step, "already-complete", 0.0, checkpoint=ckpt.path,
                                 is_main=info.is_main)
        policy.apply_backend_flags()
        teacher.to(info.device, dtype=policy.network)
        writer = CheckpointWriter(background=policy.background_saves)
        with Observer(run_dir, is_main=info.is_main, quiet=quiet, json_out=json_out,
                      tensorboard=cfg.distill.tensorboard) as obs, StopFlag() as stop:
            run = Distiller(cfg, info=info, run_dir=run_dir, teacher=teacher, observer=obs,
                            policy=policy, writer=writer)
            runs.announce(obs, cfg, info, teacher, run.state.student, count_parameters,
                          runtime=policy.describe())
            try:
                restored = run.prepare_source(ckpt, stop)
            except StoppedDuringStartup:  # exit now; the start-up is rebuilt on the next run
                return DistillResult(run_dir, ckpt.step if ckpt else 0, "interrupted",
                                     time.perf_counter() - start,
                                     checkpoint=ckpt.path if ckpt else None, is_main=info.is_main,
                                     exit_code=stop.exit_code, signal=stop.name,
                                     during_startup=True)
            if ckpt is not None:
                run.state.restore(ckpt)
                if run.objective is not None:
                    run.objective.restore(ckpt)
                runs.warn_if_not_exact(cfg, restored)
            elif info.is_main and run.startup is not None:
                runs.write_startup(run_dir, run.startup)
            try:
                status, last = run.train(stop)
            finally:
                writer.wait()  # the last checkpoint is on disk before anything else happens
            path = run.save(wait=True) if status == "interrupted" else \
                checkpoint_path(run_dir, run.state.step)
        return DistillResult(run_dir, run.state.step, status, time.perf_counter() - start, last, path,
                             is_main=info.is_main, exit_code=stop.exit_code, signal=stop.name,
                             teacher_forwards=run.teacher_forwards() * info.world_size,
                             num_classes=int(teacher.num_classes or 0),
                             null_class=teacher.null_class,
                             guidance_scale=cfg.distill.guidance_scale)
    finally:
        if opened is not None:
            opened.lock.release()
        shutdown(info)
