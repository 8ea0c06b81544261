"""The GPU check, and its CPU smoke run: the same script, so it cannot rot unseen.

    bash benchmarks/gpu_check.sh            # one NVIDIA GPU, one call, under 8 minutes
    bash benchmarks/gpu_check.sh --smoke    # the CPU at tiny sizes (CI runs it: tests/test_gpu_check.py)

Two parts, one JSON line on stdout:
- families: every teacher family dkdm reads (built-in, improved-diffusion .pt, diffusers
  UNet2DModel folder, latent folder with its VQ decoder, diffusers DiT with its KL decoder, a
  run directory) in every precision policy (teacher fp32 / bf16 / fp16), at tiny sizes: the
  teacher forward's error against float32, and two distillation iterations with the student
  under bf16 autocast. On the GPU this is what proves the policies run there.
- cases: the loop at size, in the run's policy (bf16 and compile on a GPU):
  (a) unet-b -> unet-s at 32x32x3, batch 128; (b) a 35M UNet teacher (ldm-celebahq's UNet2DModel,
  random weights) -> dit-s/2 at 64x64x3, batch 128; (c) a DiT-XL/2-shaped teacher (random
  weights) -> dit-s/2 at 32x32x4, batch 128, 1000 classes. Per case: images/s, the iteration
  time over (teacher forward + student forward/backward/step) in alternating rounds, MFU from
  FLOPs counted on the meta device, peak memory, the first iteration's time (compile),
  channels_last's speed beside the default, and sampling images/s (50 steps, EMA student and
  teacher). The smoke run uses tiny versions of the same three cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dkdm_cli import testing
from dkdm_cli.config import load_config
from dkdm_cli.diffusion.samplers import sample
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.distill.saver import CheckpointWriter
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.precision import DTYPES, distill_policy
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.spec import resolve_teacher

HUB = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hub"
# Dense bf16 tensor-core peaks (vendor data sheets), for MFU; unknown devices report none.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12}


def sync(device: torch.device) -> None:
    """Wait for the device (timing only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds for fn() with the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocator, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


# -- teachers -------------------------------------------------------------------------------------

def _diffusers_teacher(name: str, module, settings: DiffusionSettings, shape) -> Teacher:
    return Teacher(name=name, model=module, settings=settings, sample_shape=shape)


def case_teacher(case: str, *, smoke: bool, tmp: Path) -> Teacher:
    """The teacher of case a, b or c (random weights; tiny in the smoke run)."""
    if case == "a":
        if smoke:
            return resolve_teacher(str(testing.write_teacher_file(tmp / "a.safetensors",
                                                                  channels=3)))
        model = create_model("unet-b", image_size=32, in_channels=3, learn_sigma=True)
        settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, variance="learned_range")
        return Teacher(name="unet-b-random", model=model, settings=settings, sample_shape=(3, 32, 32))
    if case == "b":
        if smoke:
            return resolve_teacher(str(testing.write_ldm_folder(tmp / "b")))
        from diffusers import UNet2DModel

        from dkdm_cli.teachers.diffusers_folder import DiffusersUNet
        from dkdm_cli.teachers.diffusers_io import read_config

        unet = UNet2DModel.from_config(read_config(HUB / "CompVis--ldm-celebahq-256" / "unet"
                                                   / "config.json"))
        settings = DiffusionSettings(schedule="scaled_linear", num_timesteps=1000,
                                     beta_start=0.0015, beta_end=0.0195, clip_denoised=False)
        return _diffusers_teacher("ldm-celebahq-unet-random", DiffusersUNet(unet), settings, (3, 64, 64))
    if smoke:
        return resolve_teacher(str(testing.write_dit_folder(tmp / "c")))
    from dkdm_cli.teachers.diffusers_dit import DiffusersDiT, _dit_class, dit_config
    from dkdm_cli.teachers.diffusers_io import read_config

    path = HUB / "facebook--DiT-XL-2-256" / "transformer" / "config.reconstructed.json"
    config = dict(dit_config(read_config(path), source=str(path)), sample_size=32)
    dit = DiffusersDiT(_dit_class().from_config(config))
    settings = DiffusionSettings(schedule="linear", num_timesteps=1000, beta_start=1e-4,
                                 beta_end=0.02, variance="learned_range", clip_denoised=False)
    return _diffusers_teacher("dit-xl2-shaped-random", dit, settings, (4, 32, 32))


def family_specs(tmp: Path) -> dict[str, tuple[str, str, dict]]:
    """family -> (teacher spec, arch, arch_kwargs), every one tiny and built here."""
    run_dir = tmp / "run-dir"
    return {
        "built-in": ("digits", "", {}),
        "adm-pt": (str(testing.write_adm_checkpoint(tmp / "adm.pt")), testing.ADM_ARCH,
                   dict(testing.ADM_FLAGS)),
        "diffusers-unet": (str(testing.write_ddpm_folder(tmp / "ddpm")), "", {}),
        "latent-vq": (str(testing.write_ldm_folder(tmp / "ldm")), "", {}),
        "diffusers-dit-kl": (str(testing.write_dit_folder(tmp / "dit")), "", {}),
        "run-dir": (str(run_dir), "", {}),  # written by the first family check
    }


# -- the loop -----------------------------------------------------------------------------------

@dataclass
class Setting:
    """What one Distiller is built with."""

    student: str
    batch: int
    precision: str = "auto"
    teacher_precision: str = "auto"
    compile: str = "auto"
    student_kwargs: str = "{}"
    rho: float = 0.01
    teacher_spec: str = "bench"  # recorded in checkpoints: a real spec where one is saved


def distiller(teacher: Teacher, s: Setting, run_dir: Path, device: torch.device) -> Distiller:
    """A Distiller for `teacher` in policy `s`, with its pool started (2-step start-up)."""
    cfg = load_config(None, search_cwd=False, sets=[
        f'teacher.name="{s.teacher_spec}"', f'student.name="{s.student}"',
        f"student.kwargs={s.student_kwargs}",
        f"distill.batch_size={s.batch}", f"distill.rho={s.rho}", "distill.init_steps=2",
        "distill.init_batch_size=1024", f'distill.device="{device}"',
        f'distill.precision="{s.precision}"', f'distill.teacher_precision="{s.teacher_precision}"',
        f'distill.compile="{s.compile}"', "distill.grid_every=0"])
    policy = distill_policy(cfg.distill, device)
    policy.apply_backend_flags()
    teacher.to(device, dtype=policy.network)
    obs = Observer(run_dir, is_main=True, quiet=True, json_out=False, tensorboard=False)
    run = Distiller(cfg, info=DistInfo(device=device), run_dir=run_dir, teacher=teacher, observer=obs,
                    policy=policy, writer=CheckpointWriter(background=False))
    run.prepare_source(None)
    return run


def student_step(run: Distiller, x, t, y):
    """One student forward/backward/optimizer step on fixed inputs (what an iteration adds)."""
    st, labels = run.state, (() if y is None else (y,))

    def step():
        with run.policy.autocast():
            out = run.train_model(x, t, *labels)
        loss = out.float().square().mean()
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        st.opt.step()

    return step


def count_flops(teacher: Teacher, student: torch.nn.Module, x, t, y) -> float | None:
    """FLOPs of one iteration (teacher forward + student forward and backward) counted on the
    meta device (shapes only: nothing is allocated or computed)."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    try:
        labels = () if y is None else (y.to("meta"),)
        xm, tm = x.to("meta"), t.to("meta")
        tnet = copy.deepcopy(teacher.model).to("meta")
        snet = copy.deepcopy(student).to("meta")
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                tnet(xm.to(teacher.dtype), tm, *labels)
            snet(xm, tm, *labels).float().sum().backward()
        return float(counter.get_total_flops())
    except Exception as exc:  # some op without a meta kernel: report, do not fail the check
        print(f"flop count skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def measure_case(name: str, teacher: Teacher, s: Setting, *, device, rounds: int, iters: int,
                 sample_num: int, tmp: Path) -> dict:
    """Throughput, overhead ratio, MFU, memory and sampling speed of one case."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run = distiller(teacher, s, tmp / name, device)
    out: dict = {"case": name, "teacher": teacher.name, "student": s.student, "batch": s.batch,
                 "shape": list(teacher.sample_shape), "runtime": run.policy.describe(),
                 "teacher_params": count_parameters(teacher.model),
                 "student_params": count_parameters(run.state.student),
                 "setup_seconds": round(time.perf_counter() - start, 2)}
    window = MetricWindow(device, teacher.diffusion.num_timesteps)
    pool = run.source.pool
    x, t = pool.x[: s.batch].clone(), pool.t[: s.batch].clone()
    y = pool.y[: s.batch].clone() if pool.y is not None else None
    fns = (lambda: run.iteration(window),
           lambda: run.source.teacher_fn(x, t, *(() if y is None else (y,))),
           student_step(run, x, run.diffusion.model_timesteps(t), y))
    out["first_iteration_seconds"] = round(timed(fns[0], device), 3)  # the compile, if any
    for fn in fns:
        for _ in range(2):
            fn()
    ratios, its = [], []
    for _ in range(rounds):
        it, tf, ss = (timed(fn, device) for fn in fns)
        ratios.append(it / (tf + ss))
        its.append(it)
    out["iteration_over_parts_median"] = round(statistics.median(ratios), 4)
    secs = timed(lambda: [run.iteration(window) for _ in range(iters)], device)
    out["it_per_s"] = round(iters / secs, 3)
    out["images_per_s"] = round(iters * s.batch / secs, 1)
    flops = count_flops(teacher, run.state.student, x, run.diffusion.model_timesteps(t), y)
    out["gflops_per_iteration"] = None if flops is None else round(flops / 1e9, 2)
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda"
                 and k in torch.cuda.get_device_name(device)), None)
    out["mfu"] = None if flops is None or peak is None else round(flops * iters / secs / peak, 4)
    out["peak_memory_gib"] = peak_memory_gib(device)
    out["channels_last"] = channels_last_speed(run, x, t, y, device, rounds=max(1, rounds // 2))
    out["sampling"] = sampling_speed(run, teacher, device, num=sample_num)
    return out


def channels_last_speed(run: Distiller, x, t, y, device, *, rounds: int) -> dict:
    """The eager student's step in the default memory format and in channels_last, alternating
    rounds (dkdm does not switch it on: this is the measurement that would decide; eager, so the
    compiled student is not recompiled for the other strides)."""
    st, mt = run.state, run.diffusion.model_timesteps(t)
    labels = () if y is None else (y,)

    def step(inputs):
        def go():
            with run.policy.autocast():
                out = st.student(inputs, mt, *labels)
            st.opt.zero_grad(set_to_none=True)
            out.float().square().mean().backward()
            st.opt.step()
        return go

    plain, last = step(x), step(x.contiguous(memory_format=torch.channels_last))
    a, b = [], []
    for _ in range(rounds):
        st.student.to(memory_format=torch.contiguous_format)
        a.append(timed(plain, device))
        st.student.to(memory_format=torch.channels_last)
        b.append(timed(last, device))
    st.student.to(memory_format=torch.contiguous_format)
    return {"default_s": round(statistics.median(a), 5), "channels_last_s": round(statistics.median(b), 5)}


def sampling_speed(run: Distiller, teacher: Teacher, device, *, num: int, steps: int = 50) -> dict:
    """Images/s of 50-step ancestral sampling: the EMA student (autocast) and the teacher."""
    steps = min(steps, teacher.diffusion.num_timesteps)
    shape = (num, *teacher.sample_shape)
    noise = torch.randn(shape, device=device)
    y = (torch.arange(num, device=device) % teacher.num_classes) if teacher.conditional else None
    shadow, labels = run.state.ema.shadow, (() if y is None else (y,))

    def student():
        with run.policy.autocast():
            sample(lambda a, b: shadow(a, b, *labels).float(), run.diffusion, noise=noise, steps=steps)

    def teacher_run():
        sample(lambda a, b: teacher.denoise(a, b, y), run.diffusion, noise=noise, steps=steps)

    return {"steps": steps, "num": num, "student_images_per_s": round(num / timed(student, device), 1),
            "teacher_images_per_s": round(num / timed(teacher_run, device), 1)}


# -- families -----------------------------------------------------------------------------------

def check_family(family: str, spec, policy: str, *, device, tmp: Path) -> dict:
    """A tiny teacher of `family` in teacher precision `policy`: its forward against float32,
    and two iterations with a bf16-autocast student. The first check writes the run directory
    that the 'run-dir' family then reads as a teacher."""
    path, arch, flags = spec
    ref = resolve_teacher(path, arch=arch, arch_kwargs=flags).to(device)
    low = resolve_teacher(path, arch=arch, arch_kwargs=flags)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((3, *ref.sample_shape), generator=gen).to(device)
    t = torch.tensor([0, ref.diffusion.num_timesteps // 2, ref.diffusion.num_timesteps - 1], device=device)
    y = (torch.arange(3, device=device) % ref.num_classes) if ref.conditional else None
    want = ref.model_output(x, t, y)
    student = "dit-n/2" if ref.sample_shape[1] % 2 == 0 and family == "diffusers-dit-kl" else "unet-t"
    kwargs = "{}" if student.startswith("dit") else \
        "{model_channels=8, channel_mult=[1, 2], attention_resolutions=[2], num_heads=1}"
    s = Setting(student=student, batch=4, precision="bf16", teacher_precision=policy,
                compile="off", student_kwargs=kwargs, rho=0.01 if family == "built-in" else 0.1,
                teacher_spec=path if family == "built-in" else "bench")
    run_dir = tmp / "run-dir" if family == "built-in" and policy == "fp32" else tmp / f"{family}-{policy}"
    run = distiller(low, s, run_dir, device)
    got = low.model_output(x, t, y)
    window = MetricWindow(device, low.diffusion.num_timesteps)
    losses = [run.iteration(window).item() for _ in range(2)]
    if run_dir.name == "run-dir":
        run.save(wait=True)
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    return {"family": family, "teacher_precision": policy, "network": run.policy.describe()["network"],
            "rel_error_vs_fp32": round(err, 6), "losses_finite": all(map(_finite, losses))}


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


# -- main -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU at tiny sizes")
    parser.add_argument("--cases", default="abc", help="which of the cases a, b, c to run")
    args = parser.parse_args(argv)
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --smoke for the CPU version", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out: dict = {"bench": "gpu_check", "mode": "smoke" if smoke else "gpu", "torch": torch.__version__,
                 "device": "cpu" if smoke else torch.cuda.get_device_name(device)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        specs = family_specs(tmp)
        out["families"] = [check_family(f, spec, p, device=device, tmp=tmp)
                           for f, spec in specs.items() for p in ("fp32", "bf16", "fp16")]
        out["families_seconds"] = round(time.perf_counter() - start, 1)
        settings = {  # the smoke run: same cases, tiny models and batches, one of them compiled
            "a": Setting("unet-t" if smoke else "unet-s", 4 if smoke else 128,
                         student_kwargs="{model_channels=8}" if smoke else "{}",
                         compile="on" if smoke else "auto"),
            "b": Setting("dit-n/2" if smoke else "dit-s/2", 4 if smoke else 128, compile="auto"),
            "c": Setting("dit-n/2" if smoke else "dit-s/2", 4 if smoke else 128, compile="auto"),
        }
        out["cases"] = []
        for case in args.cases:
            with _compile_backend("aot_eager" if smoke else None):
                teacher = case_teacher(case, smoke=smoke, tmp=tmp)
                out["cases"].append(measure_case(
                    case, teacher, settings[case], device=device, rounds=2 if smoke else 10,
                    iters=2 if smoke else 20, sample_num=4 if smoke else 256, tmp=tmp))
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["dtypes_checked"] = sorted(DTYPES)
    print(json.dumps(out), flush=True)
    return 0


@contextlib.contextmanager
def _compile_backend(name: str | None):
    """The smoke run compiles with aot_eager (seconds, not minutes, on a CPU)."""
    import os

    if name is None:
        yield
        return
    old = os.environ.get("DKDM_COMPILE_BACKEND")
    os.environ["DKDM_COMPILE_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DKDM_COMPILE_BACKEND", None)
        else:
            os.environ["DKDM_COMPILE_BACKEND"] = old


if __name__ == "__main__":
    sys.exit(main())
