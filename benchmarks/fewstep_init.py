"""Few-step students from random weights against the two-stage recipe, at equal teacher compute
(issue 21; docs/fewstep.md).

The two-stage recipe is `dkdm distill` (1,600 iterations on digits) then `dkdm distill
--few-step` (1,000): 2,600 iterations of one teacher forward per pool state. From random
weights the same 2,600 iterations go to the consistency objective alone, at the few-step
learning rate (what `--objective consistency` gives) and at DKDM's from-scratch one. Each
student is measured like table 7 (digits Frechet of 1,000 consistency samples at 1, 2, 4 and 8
steps). Results: docs/results/study/fewstep-init.json (resumable per entry).

    python benchmarks/fewstep_init.py [--two-stage study-runs/runs/t7-dkdm-s0-fast]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = (1, 2, 4, 8)
VARIANTS = {  # name: distill settings on top of `--objective consistency` from random weights
    "random-lr2e-4": {},
    "random-lr2e-3": {"lr": 2e-3, "warmup": 100},
}


def _train(run_dir: Path, iterations: int, extra: dict, seed: int) -> float:
    from dkdm_cli.config import load_config
    from dkdm_cli.distill.engine import distill

    flags = {"teacher": {"name": "digits"}, "student": {"name": "unet-n"},
             "distill": {"objective": "consistency", "iterations": iterations, "seed": seed,
                         "grid_every": 0, "device": "cpu", "run_dir": str(run_dir), **extra}}
    start = time.perf_counter()
    distill(load_config(None, search_cwd=False, flags=flags), force=True, quiet=True)
    return time.perf_counter() - start


def _measure(spec: str, num: int, seed: int) -> dict[str, float]:
    from dkdm_cli.quality.digits import measure_digits
    from dkdm_cli.sample import generate
    from dkdm_cli.teachers.spec import resolve_teacher

    model = resolve_teacher(spec)
    return {str(n): round(measure_digits(generate(model, num=num, steps=n, sampler="consistency",
                                                  seed=seed, batch_size=250)).frechet, 4)
            for n in STEPS}


def _teacher_forwards(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return int(rows[-1]["teacher_forwards"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--two-stage", default=str(ROOT / "study-runs/runs/t7-dkdm-s0-fast"),
                    help="the few-step run of the two-stage recipe (table 7's, seed 0)")
    ap.add_argument("--work", default=str(ROOT / "study-runs/runs"))
    ap.add_argument("--iterations", type=int, default=2600)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs/results/study/fewstep-init.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {"num": args.num,
                                                                       "seed": args.seed}
    two = Path(args.two_stage)
    if "two-stage" not in out:
        first = Path(str(two).removesuffix("-fast"))
        out["two-stage"] = {"frechet": _measure(str(two), args.num, args.seed),
                            "teacher_forwards": _teacher_forwards(first) + _teacher_forwards(two)}
    for name, extra in VARIANTS.items():
        if name in out:
            continue
        run_dir = Path(args.work) / f"fewstep-init-{name}"
        seconds = _train(run_dir, args.iterations, extra, args.seed)
        out[name] = {"frechet": _measure(str(run_dir), args.num, args.seed), "settings": extra,
                     "iterations": args.iterations, "train_seconds": round(seconds, 1),
                     "teacher_forwards": _teacher_forwards(run_dir)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(out, indent=2) + "\n")
        print(name, out[name], flush=True)
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
