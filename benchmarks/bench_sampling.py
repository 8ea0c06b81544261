"""Sampling throughput: images per second of `dkdm_cli.sample.generate`, and what the sampling
loop costs on top of the model's own forwards.

Cases: a random-weight `unet-t` at 16x16x1 (always), and the built-in `digits` teacher when
dkdm_cli/teachers/weights/digits.safetensors exists. For each, in alternating rounds (this
machine's speed drifts): one `generate` call of --num images with --steps steps, and the same
number of bare model forwards on the same batch shapes. loop_overhead_paired_median is the
median over rounds of 1 - forwards / generate (each round's pair ran back to back); with a
busy machine, best_* (the fastest round) is the fairest throughput.
Prints one JSON line per case on stdout.

Example:
    python benchmarks/bench_sampling.py --num 64 --steps 50 --batch 64 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from dkdm_cli import __version__
from dkdm_cli.diffusion.settings import DiffusionSettings
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.sample import generate
from dkdm_cli.teachers.base import Teacher
from dkdm_cli.teachers.builtin import builtin_weights


def tiny_teacher() -> Teacher:
    """unet-t at 16x16x1 with random weights, cosine T = 1000, learned-range variance."""
    torch.manual_seed(0)
    model = create_model("unet-t", image_size=16, in_channels=1, learn_sigma=True)
    settings = DiffusionSettings(schedule="cosine", num_timesteps=1000, variance="learned_range")
    return Teacher(name="unet-t (random)", model=model, settings=settings, sample_shape=(1, 16, 16))


def cases() -> list[Teacher]:
    """The teachers to time."""
    out = [tiny_teacher()]
    if builtin_weights("digits").is_file():
        from dkdm_cli.teachers.spec import resolve_teacher

        out.append(resolve_teacher("digits"))
    return out


def bare_forwards(teacher: Teacher, *, num: int, steps: int, batch: int) -> None:
    """The model calls a sampling run makes, with nothing around them."""
    t_model = torch.full((batch,), 500, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, num, batch):
            x = torch.randn(min(batch, num - start), *teacher.sample_shape)  # (B, C, H, W)
            for _ in range(steps):
                teacher.denoise(x, t_model[: len(x)])


def bench(teacher: Teacher, args) -> dict:
    """Median seconds of generate and of the bare forwards, in alternating rounds."""
    times: dict[str, list[float]] = {"generate": [], "forwards": []}
    runs = {
        "generate": lambda: generate(teacher, num=args.num, steps=args.steps, sampler=args.sampler,
                                     batch_size=args.batch, seed=0),
        "forwards": lambda: bare_forwards(teacher, num=args.num, steps=args.steps, batch=args.batch),
    }
    for round_ in range(args.rounds + 1):  # round 0 warms up, not timed
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[key].append(time.perf_counter() - start)
        print(f"{teacher.name}: round {round_} done", file=sys.stderr)
    gen, fwd = statistics.median(times["generate"]), statistics.median(times["forwards"])
    # Rounds run back to back, so each round's ratio is the least disturbed by drift.
    paired = statistics.median(1 - f / g for g, f in zip(times["generate"], times["forwards"], strict=True))
    best = min(times["generate"])
    return {
        "teacher": teacher.name, "parameters": count_parameters(teacher.model),
        "shape": list(teacher.sample_shape), "num": args.num, "steps": args.steps,
        "sampler": args.sampler, "batch": args.batch, "rounds": args.rounds,
        "generate_s": round(gen, 4), "images_per_second": round(args.num / gen, 2),
        "best_generate_s": round(best, 4), "best_images_per_second": round(args.num / best, 2),
        "forwards_s": round(fwd, 4), "loop_overhead_paired_median": round(paired, 4),
        "all_generate_s": [round(s, 4) for s in times["generate"]],
        "all_forwards_s": [round(s, 4) for s in times["forwards"]],
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dkdm": __version__,
        "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--sampler", default="iddpm", choices=("iddpm", "ddim"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for teacher in cases():
        print(json.dumps(bench(teacher, args)), flush=True)


if __name__ == "__main__":
    main()
