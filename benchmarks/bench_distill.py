"""Distillation-engine benchmarks (issue 5). Prints one JSON line per benchmark.

  overhead  one iteration / (one teacher forward on b + one student fwd/bwd/step on b),
            measured in alternating rounds in one process so machine drift cancels
  startup   teacher sample-steps and seconds of exact vs fast pool start-up
  memory    pool bytes vs N x sample size; checkpoint size with and without the pool

Example:
  OMP_NUM_THREADS=2 python benchmarks/bench_distill.py overhead --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dkdm_cli.config import load_config
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.distill.pool import init_pool
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.teachers.base import Teacher


def reference_teacher(device: str) -> Teacher:
    """The reference measurement's teacher: ADM UNet, 64 ch, 2 res blocks, attention at 16x16,
    learned sigma, 32x32x3, T = 1000 cosine (random weights: timing only)."""
    torch.manual_seed(0)
    model = create_model("unet-s", image_size=32, in_channels=3, learn_sigma=True, model_channels=64,
                         num_res_blocks=2, attention_resolutions=(2,), dropout=0.0)
    settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, variance="learned_range")
    return Teacher(name="ref-teacher", model=model.to(device), settings=settings, sample_shape=(3, 32, 32))


def _distiller(teacher: Teacher, *, batch: int, rho: float, student_kwargs: str, run_dir: Path,
               device: str, obs: Observer) -> Distiller:
    cfg = load_config(None, search_cwd=False, sets=[
        'teacher.name="bench"', 'student.name="unet-s"', f"student.kwargs={student_kwargs}",
        f"distill.batch_size={batch}", f"distill.rho={rho}", "distill.init_steps=2",
        f'distill.device="{device}"', "distill.ema_rate=0.9999",
    ])
    return Distiller(cfg, info=DistInfo(device=torch.device(device)), run_dir=run_dir, teacher=teacher,
                     observer=obs)


def bench_overhead(args) -> dict:
    """Median per-round ratio of a full iteration to its two model costs."""
    teacher = reference_teacher(args.device)
    with tempfile.TemporaryDirectory() as tmp, Observer(Path(tmp), is_main=True, quiet=True,
                                                        json_out=False, tensorboard=False) as obs:
        run = _distiller(teacher, batch=args.batch, rho=args.pool / (1000 * args.batch),
                         student_kwargs="{model_channels=32, num_res_blocks=1, dropout=0.0}",
                         run_dir=Path(tmp), device=args.device, obs=obs)
        run.prepare_source(None)
        window = MetricWindow(run.device, 1000)
        student, opt = run.state.student, run.state.opt
        x = run.source.pool.x[: args.batch].clone()
        t = run.source.pool.t[: args.batch].clone()

        def teacher_fwd():
            teacher.model_output(x, t)

        def student_step():
            out = student(x, t)
            loss = out.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def iteration():
            run.iteration(window)

        for fn in (iteration, teacher_fwd, student_step):  # warm-up
            fn()
        ratios, its, tfs, sss = [], [], [], []
        for _ in range(args.rounds):
            timings = []
            for fn in (iteration, teacher_fwd, student_step):
                start = time.perf_counter()
                fn()
                timings.append(time.perf_counter() - start)
            it, tf, ss = timings
            ratios.append(it / (tf + ss))
            its.append(it)
            tfs.append(tf)
            sss.append(ss)
        return {"bench": "overhead", "device": args.device, "threads": torch.get_num_threads(),
                "batch": args.batch, "pool": len(run.source.pool),
                "teacher_params": count_parameters(teacher.model),
                "student_params": count_parameters(student), "rounds": args.rounds,
                "median_ratio": round(statistics.median(ratios), 4),
                "ratio_quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
                "median_iteration_s": round(statistics.median(its), 4),
                "median_teacher_forward_s": round(statistics.median(tfs), 4),
                "median_student_step_s": round(statistics.median(sss), 4)}


def bench_startup(args) -> dict:
    """Exact vs fast start-up of the same pool of the digits teacher."""
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher(args.teacher)
    out = {"bench": "startup", "teacher": args.teacher, "pool": args.pool,
           "init_steps": args.init_steps}
    for init in ("fast", "exact"):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        pool = init_pool(size=args.pool, shape=teacher.sample_shape, diffusion=teacher.diffusion,
                         teacher_fn=teacher.model_output, mode="dynamic", init=init,
                         init_steps=args.init_steps, chunk=args.chunk, clip_denoised=True,
                         device=torch.device("cpu"), generator=gen)
        out[init] = {"teacher_sample_steps": pool.teacher_sample_steps,
                     "seconds": round(time.perf_counter() - start, 2)}
    out["step_ratio"] = round(out["exact"]["teacher_sample_steps"] / out["fast"]["teacher_sample_steps"], 1)
    out["time_ratio"] = round(out["exact"]["seconds"] / out["fast"]["seconds"], 1)
    return out


def bench_memory(args) -> dict:
    """Pool bytes against N x sample size, and checkpoint sizes with/without the pool."""
    from dkdm_cli.cli import run as cli

    out = {"bench": "memory"}
    with tempfile.TemporaryDirectory() as tmp:
        for save_pool in ("true", "false"):
            rd = Path(tmp) / f"run-{save_pool}"
            code = cli(["distill", "--teacher", args.teacher, "--student", "unet-t", "-n", "2", "-b", "64",
                        "--run-dir", str(rd), "--quiet", "--set", f"distill.save_pool={save_pool}",
                        "--set", "distill.init_steps=1", "--set", "distill.grid_every=0"])
            if code:
                raise SystemExit(code)
            startup = json.loads((rd / "startup.json").read_text())
            ckpt = next((rd / "checkpoints").iterdir())
            out[f"checkpoint_bytes_save_pool_{save_pool}"] = ckpt.stat().st_size
        n = startup["pool_size"]
        out.update({"pool_states": n, "pool_bytes": startup["pool_bytes"],
                    "n_times_sample_bytes": n * 16 * 16 * 4, "t_bytes": n * 8})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=("overhead", "startup", "memory"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=320)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--teacher", default="digits")
    ap.add_argument("--init-steps", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    fn = {"overhead": bench_overhead, "startup": bench_startup, "memory": bench_memory}[args.which]
    print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
