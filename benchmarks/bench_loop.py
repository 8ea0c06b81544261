"""The training loop's speed on the CPU, for comparing two versions of dkdm (issue 19: "the loop
is no slower than today"). Uses only the engine API both versions share, so the same script
times whichever `dkdm_cli` is first on PYTHONPATH; run the versions in alternating processes:

    for i in 1 2 3; do
      PYTHONPATH=/path/to/old python benchmarks/bench_loop.py --label old
      PYTHONPATH=.            python benchmarks/bench_loop.py --label new
    done

Per process: `--rounds` alternating rounds of (one iteration, one teacher forward on the same
b states, one student forward/backward/optimizer step), medians, and the median of the per-round
ratio iteration / (teacher forward + student step). One JSON line.

Cases: `digits` (the default demo: the built-in teacher, unet-n, b = 64) and `reference` (the
reference code's measurement: a 10.7M ADM UNet teacher at 32x32x3 into a 1.9M one, b = 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dkdm_cli.config import load_config
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.models import create_model
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.spec import resolve_teacher


def case(name: str) -> tuple[Teacher, list[str]]:
    """(teacher, settings) of a benchmark case."""
    if name == "digits":
        return resolve_teacher("digits"), ['student.name="unet-n"', "distill.batch_size=64",
                                           "distill.rho=0.1", "distill.init_steps=2"]
    torch.manual_seed(0)
    model = create_model("unet-s", image_size=32, in_channels=3, learn_sigma=True, model_channels=64,
                         num_res_blocks=2, attention_resolutions=(2,), dropout=0.0)
    settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, variance="learned_range")
    teacher = Teacher(name="ref-teacher", model=model, settings=settings, sample_shape=(3, 32, 32))
    return teacher, ['student.name="unet-s"', "student.kwargs={model_channels=32, num_res_blocks=1, "
                     "dropout=0.0}", "distill.batch_size=32", "distill.rho=0.01", "distill.init_steps=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("digits", "reference"), default="digits")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--label", default="")
    parser.add_argument("--compile", action="store_true",
                        help="compile the loop (new versions only): its first iteration is the cold "
                        "compile, and the ratio is then compiled iteration / eager parts")
    args = parser.parse_args()
    teacher, sets = case(args.case)
    if args.compile:
        sets.append('distill.compile="on"')
    cfg = load_config(None, search_cwd=False, sets=['teacher.name="bench"', 'distill.device="cpu"',
                                                    "distill.ema_rate=0.999", *sets])
    with tempfile.TemporaryDirectory() as tmp, Observer(Path(tmp), is_main=True, quiet=True,
                                                        json_out=False, tensorboard=False) as obs:
        run = Distiller(cfg, info=DistInfo(), run_dir=Path(tmp), teacher=teacher, observer=obs)
        run.prepare_source(None)
        window = MetricWindow(run.device, teacher.diffusion.num_timesteps)
        student, opt = run.state.student, run.state.opt
        b = cfg.distill.batch_size
        x, t = run.source.pool.x[:b].clone(), run.source.pool.t[:b].clone()

        def student_step():
            loss = student(x, t).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns = (lambda: run.iteration(window), lambda: teacher.model_output(x, t), student_step)
        start = time.perf_counter()
        fns[0]()
        first = time.perf_counter() - start  # with --compile: the cold compile
        for fn in fns:
            for _ in range(3):
                fn()
        times: list[list[float]] = [[], [], []]
        for _ in range(args.rounds):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
        ratios = [it / (tf + ss) for it, tf, ss in zip(*times, strict=True)]
    commit = subprocess.run(["git", "-C", str(Path(__import__("dkdm_cli").__file__).parent), "rev-parse",
                             "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"bench": "loop", "label": args.label, "commit": commit, "case": args.case,
                      "threads": torch.get_num_threads(), "rounds": args.rounds,
                      "compile": args.compile, "first_iteration_s": round(first, 3),
                      "optimizer": type(opt).__name__ + (" fused" if opt.defaults.get("fused") else ""),
                      "median_iteration_s": round(statistics.median(times[0]), 5),
                      "median_teacher_forward_s": round(statistics.median(times[1]), 5),
                      "median_student_step_s": round(statistics.median(times[2]), 5),
                      "median_ratio": round(statistics.median(ratios), 4)}), flush=True)


if __name__ == "__main__":
    main()
