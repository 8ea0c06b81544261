"""Table 7 of the study: quality and speed against sampling steps, for the teacher, the default
DKDM student and the few-step student made from it (issue 21).

Per seed: the default demo's run (`dkdm distill` on digits with its recommended settings, at
that seed), then `dkdm distill --few-step <that run>` at the same seed. Each model is measured
(the digits measure's Frechet distance of `samples` samples) at 1, 2, 4, 8, 16 and 50 steps with
its samplers: the teacher and the DKDM student with IDDPM, DDIM and DPM-Solver++(2M) (diffusers',
with the teacher's x0 clipping), the few-step student with its consistency sampling. Speed:
images/s of the configurations that matter, in alternating rounds on one thread. Every result
is a JSON file under the study's results folder (resumable, committed with its command).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

STEPS = (1, 2, 4, 8, 16, 50)
QUICK_STEPS = (1, 2, 4)  # --quick: the table's shape in a minute
TEACHER_SAMPLERS = ("iddpm", "ddim", "dpm-solver++")
FULL_SAMPLES, QUICK_SAMPLES = 1000, 64


def run_dirs(study, seed: int) -> tuple[Path, Path]:
    """(DKDM run, few-step run) of `seed`, trained if missing (the documented two commands)."""
    from dkdm_cli.config import load_config
    from dkdm_cli.distill.engine import distill
    from dkdm_cli.distill.warmstart import few_step_flags

    base = study.work / "runs"
    dkdm_dir, fast_dir = base / f"t7-dkdm-s{seed}", base / f"t7-dkdm-s{seed}-fast"
    quick = {"iterations": 8, "batch_size": 8, "rho": 0.01} if study.quick else {}
    common = {"seed": seed, "grid_every": 0, "device": "cpu", **quick}
    if not (dkdm_dir / "checkpoints").is_dir() or not _complete(dkdm_dir):
        study.log(f"table 7: the default DKDM student, seed {seed}")
        cfg = load_config(None, search_cwd=False, flags={
            "teacher": {"name": "digits"}, "distill": {"run_dir": str(dkdm_dir), **common}})
        distill(cfg, force=True, quiet=True)
    if not (fast_dir / "checkpoints").is_dir() or not _complete(fast_dir):
        study.log(f"table 7: the few-step student, seed {seed}")
        flags = few_step_flags(dkdm_dir)
        flags["distill"].update({**common, "run_dir": str(fast_dir)})
        start = time.perf_counter()
        distill(load_config(None, search_cwd=False, flags=flags), force=True, quiet=True)
        (fast_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return dkdm_dir, fast_dir


def _complete(run_dir: Path) -> bool:
    from dkdm_cli.checkpoint import load_latest

    ckpt = load_latest(run_dir)
    return ckpt is not None and ckpt.step >= int(ckpt.doc["config"]["distill"]["iterations"])


def measure(study, name: str, spec: str, samplers: tuple[str, ...], seed: int) -> dict[str, Any]:
    """{sampler: {steps: frechet}} of one model (cached in a result file)."""
    from dkdm_cli.quality.digits import measure_digits
    from dkdm_cli.sample import generate
    from dkdm_cli.teachers.spec import resolve_teacher

    num = QUICK_SAMPLES if study.quick else FULL_SAMPLES
    path = study.results / f"t7-{name}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = resolve_teacher(spec)
    out: dict[str, Any] = {"model": name, "spec": spec, "seed": seed, "samples": num,
                           "commit": study.commit, "frechet": {}}
    for sampler in samplers:
        row = {}
        for steps in QUICK_STEPS if study.quick else STEPS:
            images = generate(model, num=num, steps=steps, sampler=sampler, seed=seed, batch_size=250)
            row[str(steps)] = round(measure_digits(images).frechet, 4)
        out["frechet"][sampler] = row
        study.log(f"table 7: {name} {sampler} seed {seed}: {row}")
    study._write(path, out)
    return out


def speeds(study, specs: dict[str, str], rounds: int = 5) -> dict[str, float]:
    """Median images/s (64 images, one thread) of each (model, sampler, steps) configuration,
    timed in alternating rounds: {"name sampler steps": img/s}."""
    from dkdm_cli.sample import generate
    from dkdm_cli.teachers.spec import resolve_teacher

    path = study.results / "t7-speed.json"
    if path.is_file():
        return json.loads(path.read_text())["images_per_s"]
    models = {name: resolve_teacher(spec) for name, spec in specs.items()}
    configs = [("teacher", s, n) for s, n in (("iddpm", 50), ("dpm-solver++", 4), ("dpm-solver++", 8),
                                               ("dpm-solver++", 16))]
    configs += [("dkdm", "iddpm", 50), ("dkdm", "dpm-solver++", 8)]
    configs += [("fast", "consistency", n) for n in (1, 2, 4, 8)]
    if study.quick:
        configs, rounds = [c for c in configs if c[2] <= 4], 1
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {f"{m} {s} {n}": [] for m, s, n in configs}
    try:
        for r in range(rounds + 1):
            for m, s, n in configs:
                start = time.perf_counter()
                generate(models[m], num=64, steps=n, sampler=s, seed=0, batch_size=64)
                if r:
                    times[f"{m} {s} {n}"].append(64 / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    out = {k: round(statistics.median(v), 1) for k, v in times.items()}
    study._write(path, {"images_per_s": out, "rounds": rounds, "threads": 1, "num": 64,
                        "commit": study.commit})
    return out


def run_table(study, seeds: int) -> None:
    """Train (if needed) and measure every model of table 7 at `seeds` seeds."""
    for seed in range(seeds):
        dkdm_dir, fast_dir = run_dirs(study, seed)
        measure(study, "teacher", "digits", TEACHER_SAMPLERS, seed)
        measure(study, "dkdm", str(dkdm_dir), TEACHER_SAMPLERS, seed)
        measure(study, "fast", str(fast_dir), ("consistency",), seed)
    dkdm_dir, fast_dir = run_dirs(study, 0)
    speeds(study, {"teacher": "digits", "dkdm": str(dkdm_dir), "fast": str(fast_dir)})
    grid_figure(study, fast_dir)


def grid_figure(study, fast_dir: Path) -> Path:
    """The few-step student at 1, 2 and 4 steps beside the teacher's 50 (IDDPM), same noise."""
    from dkdm_cli.sample import generate, initial_noise, make_grid, side_by_side, write_png
    from dkdm_cli.teachers.spec import resolve_teacher

    path = study.results / "t7-grid.png"
    noise = initial_noise(16, (1, 16, 16), seed=2024)
    grids = [make_grid(generate(resolve_teacher("digits"), num=16, steps=50, sampler="iddpm",
                                noise=noise, seed=2024))]
    fast = resolve_teacher(str(fast_dir))
    grids += [make_grid(generate(fast, num=16, steps=n, noise=noise, seed=2024)) for n in (1, 2, 4)]
    image = grids[0]
    for g in grids[1:]:
        image = side_by_side(image, g)
    return write_png(image, path, scale=4)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(study, doc: Path) -> list[str]:
    """Table 7's markdown lines (from the result files)."""
    results = [json.loads(p.read_text()) for p in sorted(study.results.glob("t7-*-s*.json"))]
    if not results:
        return ["(table 7 not run yet: `python benchmarks/study.py --tables 7`)", ""]
    rows: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in results:
        for sampler, by_steps in r["frechet"].items():
            cell = rows.setdefault((r["model"], sampler), {})
            for n, v in by_steps.items():
                cell.setdefault(int(n), []).append(v)
    labels = {"teacher": "teacher (digits, 0.68M)", "dkdm": "DKDM student (unet-n, 0.30M)",
              "fast": "few-step student (unet-n, 0.30M)"}
    seeds = sorted({r["seed"] for r in results})
    out = [f"Digits-Frechet (lower is better) at each number of sampling steps; "
           f"{results[0]['samples']} samples, mean ± sd over {len(seeds)} seed(s) "
           "(each seed retrains both students and resamples every model).", "",
           "| model | sampler | " + " | ".join(str(n) for n in STEPS) + " |",
           "|---|---|" + "---|" * len(STEPS)]
    ref_key = "teacher iddpm 50"
    for (model, sampler), cells in sorted(rows.items(), key=lambda kv: ("tdf".index(kv[0][0][0]),
                                                                        kv[0][1])):
        out.append(f"| {labels[model]} | {sampler} | "
                   + " | ".join(_cell(cells.get(n, [])) for n in STEPS) + " |")
    speed_file = study.results / "t7-speed.json"
    if speed_file.is_file():
        sp = json.loads(speed_file.read_text())["images_per_s"]
        ref = sp.get(ref_key) or next(iter(sp.values()))
        out += ["", "Images/s (64 images, one thread, alternating rounds; x: the teacher's 50 IDDPM "
                "steps):", "", "| configuration | img/s | x |", "|---|---|---|"]
        out += [f"| {k} | {v} | {v / ref:.1f}x |" for k, v in sp.items()]
    commits = sorted({r["commit"] for r in results})
    out += ["", f"Command: `python benchmarks/study.py --tables 7 --seeds {len(seeds)}` (commits "
            f"{', '.join(commits)}; the few-step runs: `dkdm distill --few-step` of each seed's "
            "default run, benchmarks/study_steps.py)."]
    grid = study.results / "t7-grid.png"
    if grid.is_file():
        link = os.path.relpath(grid, doc.parent)
        out += ["", "The teacher at 50 IDDPM steps (left), then the few-step student at 1, 2 and 4 "
                "steps, from the same noise:", "", f"![few-step grid]({link})"]
    return out + [""]
