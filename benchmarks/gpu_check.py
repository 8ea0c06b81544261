"""GPU check (issue 5, benchmark 6): on one NVIDIA GPU, a unet-b teacher at 32x32x3 (random
weights) into a unet-s student at batch 128 in bf16: the loop-overhead ratio (alternating rounds),
throughput (it/s, images/s), peak memory, and sampling throughput. Prints one JSON line.

    bash benchmarks/gpu_check.sh
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dkdm_cli.config import Precision, load_config
from dkdm_cli.diffusion.samplers import sample
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller, _autocast
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.teachers.base import Teacher


def timed(fn) -> float:
    """Seconds for fn() with the GPU synchronised on both sides."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(batch: int = 128, rounds: int = 20, iters: int = 50) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = create_model("unet-b", image_size=32, in_channels=3, learn_sigma=True)
    settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, variance="learned_range")
    teacher = Teacher(name="unet-b-random", model=model, settings=settings, sample_shape=(3, 32, 32))
    teacher.to(device, dtype=torch.float16)
    cfg = load_config(None, search_cwd=False, sets=[
        'teacher.name="bench"', 'student.name="unet-s"', f"distill.batch_size={batch}",
        "distill.rho=0.4", "distill.init_steps=2", "distill.init_batch_size=1024",
        'distill.device="cuda"', 'distill.precision="bf16"'])
    out: dict = {"bench": "gpu_check", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "batch": batch, "teacher": "unet-b", "student": "unet-s"}
    with tempfile.TemporaryDirectory() as tmp, Observer(Path(tmp), is_main=True, quiet=True,
                                                        json_out=False, tensorboard=False) as obs:
        run = Distiller(cfg, info=DistInfo(device=device), run_dir=Path(tmp), teacher=teacher, observer=obs)
        out["teacher_params"] = count_parameters(teacher.model)
        out["student_params"] = count_parameters(run.state.student)
        start = time.perf_counter()
        run.prepare_source(None)
        torch.cuda.synchronize()
        out["startup"] = {**run.startup, "seconds": round(time.perf_counter() - start, 2)}
        window = MetricWindow(device, 1000)
        student, opt = run.state.student, run.state.opt
        x, t = run.source.pool.x[:batch].clone(), run.source.pool.t[:batch].clone()

        def student_step():
            with _autocast(device, Precision.BF16):
                o = student(x, t)
            loss = o.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns = (lambda: run.iteration(window), lambda: teacher.model_output(x, t), student_step)
        for fn in fns:
            for _ in range(3):
                fn()
        ratios = []
        for _ in range(rounds):
            it, tf, ss = (timed(fn) for fn in fns)
            ratios.append(it / (tf + ss))
        out["overhead_median_ratio"] = round(statistics.median(ratios), 4)
        torch.cuda.reset_peak_memory_stats()
        secs = timed(lambda: [run.iteration(window) for _ in range(iters)])
        out["it_per_s"] = round(iters / secs, 2)
        out["images_per_s"] = round(iters * batch / secs, 1)
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        noise = torch.randn(256, 3, 32, 32, device=device)
        ema = run.state.ema.shadow

        def sample_student():
            with _autocast(device, Precision.BF16):
                sample(lambda a, b: ema(a, b).float(), run.diffusion, noise=noise, steps=50)

        secs = timed(sample_student)
        out["sampling_images_per_s_50_steps"] = round(256 / secs, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
