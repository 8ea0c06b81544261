"""Sampling speed of a student beside its teacher: img/s of each with the same sampler, steps and
batch, measured in alternating rounds (this machine's speed drifts, so each round times every
model back to back), and each model's ratio to the first one. Prints one JSON object.

Example (the default run's student against the built-in teacher):
    python benchmarks/bench_speedup.py digits demo/runs/digits-unet-n --steps 50 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from dkdm_cli import __version__


def sampling_speeds(specs: dict[str, str], *, rounds: int = 5, num: int = 64, batch: int = 64,
                    steps: int = 10, sampler: str = "iddpm", threads: int = 0) -> dict[str, float]:
    """{name: median img/s} of `generate` for each spec (teacher name, model file or run dir),
    after one untimed warm-up round; `threads` 0 keeps torch's setting."""
    from dkdm_cli.sample import generate
    from dkdm_cli.teachers.spec import resolve_teacher

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        models = {name: resolve_teacher(spec) for name, spec in specs.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(rounds + 1):
            for name, model in models.items():
                start = time.perf_counter()
                generate(model, num=num, steps=steps, sampler=sampler, seed=0, batch_size=batch)
                if round_:
                    times[name].append(num / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return {name: round(statistics.median(v), 1) for name, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="teacher specs, model files or run directories; "
                    "the first is the reference (usually the teacher)")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--sampler", default="iddpm", choices=("iddpm", "ddim"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    speeds = sampling_speeds({m: m for m in args.models}, rounds=args.rounds, num=args.num,
                             batch=args.batch, steps=args.steps, sampler=args.sampler,
                             threads=args.threads)
    ref = speeds[args.models[0]]
    print(json.dumps({
        "images_per_second": speeds, "ratio_to_first": {m: round(v / ref, 2) for m, v in speeds.items()},
        "num": args.num, "batch": args.batch, "steps": args.steps, "sampler": args.sampler,
        "rounds": args.rounds, "threads": torch.get_num_threads() if not args.threads else args.threads,
        "torch": torch.__version__, "dkdm": __version__,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
