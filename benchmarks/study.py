"""The evidence: the paper's claims tested at small scale on the built-in `digits` teacher.

Seven tables (docs/results.md), each cell the mean and spread over seeds of the project's digits
measure (confident / balance / Frechet, dkdm_cli/quality/digits.py) of the EMA student's
samples, and the Frechet ratio to the teacher's own samples (same sampler, steps, seed, count):

  1 ablation        basic vs shuffle vs dynamic, dynamic at two rho (paper: 13.5 -> 11.2 -> 9.56)
  2 baselines       DKDM vs the synthetic baseline at EQUAL teacher forwards vs real data
  3 cross-arch      CNN->CNN, CNN->DiT, DiT->CNN, DiT->DiT (a DiT digits teacher is trained here)
  4 start-up        the default start-up vs the exact one, at equal iterations
  5 sizes           three students: params, GFLOPs, sampling img/s, Frechet ratio, and curves
  6 conditional     the class-conditional `digits-cond` teacher -> the default student: class
                    consistency (unguided and at guidance scale 3) beside the digits measure
  7 steps           quality and images/s against sampling steps (1-50) for the teacher, the
                    default DKDM student and the few-step student made from it
                    (benchmarks/study_steps.py; the default demo's settings, not the scale's)

Every run's result is a JSON file under --results (committed), keyed by its settings: a run
whose file exists is not run again, so an interrupted study resumes and a partial one can be
committed and continued later. `--render-only` rewrites docs/results.md and the figures from
those files.

    python benchmarks/study.py                   # the full study (hours on a 2-core CPU)
    python benchmarks/study.py --quick           # a ~10-minute smoke version of every table
    python benchmarks/study.py --tables 1,2 --seeds 2
    python benchmarks/study.py --render-only
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from study_plan import (  # noqa: E402  (the tables, shared with study_report.py)
    CFG_MEASURED,
    DIT_TEACHER_ARCH,
    FULL,
    QUICK,
    Scale,
    Variant,
    variants,
)

from dkdm_cli import __version__  # noqa: E402
from dkdm_cli.config import Config, load_config  # noqa: E402
from dkdm_cli.quality import digits as quality  # noqa: E402

# -- running ----------------------------------------------------------------------------------

def _key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _generate(model, scale: Scale, seed: int) -> np.ndarray:
    from dkdm_cli.sample import generate

    return generate(model, num=scale.samples, steps=scale.steps, sampler="iddpm", seed=seed,
                    batch_size=64)


def _measure(model, scale: Scale, seed: int) -> dict[str, Any]:
    """The digits measure of `scale.samples` samples; for a class-conditional model (classes drawn
    uniformly, the same for teacher and student at a seed) also the class consistency, unguided
    and at guidance scale CFG_MEASURED."""
    from dkdm_cli.sample import generate, sample_labels

    start = time.perf_counter()
    images = _generate(model, scale, seed)
    seconds = time.perf_counter() - start
    out = quality.measure_digits(images).to_dict() | {"sample_seconds": round(seconds, 2)}
    if model.conditional:
        labels = sample_labels(model, scale.samples, seed=seed)
        out["consistency"] = quality.class_consistency(images, labels)["consistency"]
        guided = generate(model, num=scale.samples, steps=scale.steps, sampler="iddpm", seed=seed,
                          batch_size=64, labels=labels, cfg=CFG_MEASURED)
        out[f"consistency_cfg{CFG_MEASURED:g}"] = quality.class_consistency(guided, labels)["consistency"]
        out[f"frechet_cfg{CFG_MEASURED:g}"] = quality.measure_digits(guided).frechet
    return out


@dataclass
class Study:
    """Where the study reads and writes, and at what scale."""

    scale: Scale
    work: Path
    results: Path
    quick: bool
    commit: str = field(default_factory=lambda: _git_commit())
    log: Any = print

    def teacher_spec(self, which: str) -> str:
        """A registered teacher's name, or the path of the DiT teacher the study trains."""
        return str(self.dit_teacher()) if which == "dit-teacher" else which

    def dit_teacher(self) -> Path:
        """A DiT digits teacher trained by the teacher-training script (built once)."""
        path = self.work / f"digits-dit-{self.scale.dit_teacher_iterations}.safetensors"
        if not path.is_file():
            from train_digits_teacher import train_teacher

            self.log(f"training the DiT digits teacher ({self.scale.dit_teacher_iterations} it)")
            train_teacher(out=path, arch=DIT_TEACHER_ARCH, iterations=self.scale.dit_teacher_iterations,
                          name="digits-dit", log=lambda s: None)
        return path

    def real_digits_npz(self) -> Path:
        """The real scikit-learn digits as the data mode reads them (uint8, 16x16x1)."""
        path = self.work / "real-digits.npz"
        if not path.is_file():
            x = quality.load_real_digits()  # (1797, 1, 16, 16) in [-1, 1]
            arr = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, arr_0=arr.numpy())
        return path

    def teacher_result(self, which: str, seed: int) -> dict[str, Any]:
        """The teacher's own figures at the study's sampler settings (cached)."""
        from dkdm_cli.teachers.spec import resolve_teacher

        spec = self.teacher_spec(which)
        payload = {"teacher": which, "spec_file": Path(spec).name, "samples": self.scale.samples,
                   "steps": self.scale.steps, "seed": seed}
        path = self.results / f"teacher-{which}-s{seed}-{_key(payload)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        model = resolve_teacher(spec)
        result = payload | {"parameters": model.num_parameters,
                            "measure": _measure(model, self.scale, seed)}
        self._write(path, result)
        return result

    def run(self, table: int, variant: Variant, seed: int, default_student: str) -> dict[str, Any]:
        """One distillation run and its measurement (skipped when its result file exists)."""
        s = self.scale
        student = variant.student or default_student
        sets = list(variant.sets)
        if "distill.mode=data" in sets:
            sets.append(f'distill.data="{self.real_digits_npz()}"')
        if variant.startup_table:
            sets.append(f"distill.rho={s.startup_rho}")
        elif s.rho is not None and not any(x.startswith("distill.rho=") for x in sets):
            sets.append(f"distill.rho={s.rho}")
        if variant.curve:
            sets += [f"distill.save_every={max(1, s.iterations // s.curve_points)}",
                     "distill.keep_last=1000"]
        payload = {"variant": variant.name, "teacher": variant.teacher, "student": student,
                   "sets": sets, "seed": seed, "scale": s.per_run()}
        path = self.results / f"run-{variant.name}-s{seed}-{_key(payload)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from dkdm_cli.distill.engine import distill

        run_dir = self.work / "runs" / f"{variant.name}-s{seed}-{_key(payload)}"
        cfg = load_config(None, flags={
            "teacher": {"name": self.teacher_spec(variant.teacher)},
            "student": {"name": student},
            "distill": {"iterations": s.iterations, "batch_size": s.batch, "seed": seed,
                        "run_dir": str(run_dir), "grid_every": 0, "device": "cpu"},
        }, sets=sets, search_cwd=False)
        self.log(f"table {table}: {variant.name} seed {seed} ({student})")
        start = time.perf_counter()
        result = distill(cfg, force=True, quiet=True)
        train_seconds = time.perf_counter() - start
        startup = json.loads((run_dir / "startup.json").read_text())
        measured = self._measure_run(run_dir, variant, seed)
        out = payload | {
            "command": _command(variant, student, seed, s, sets), "commit": self.commit,
            "run_dir": str(run_dir),
            "dkdm": __version__, "train_seconds": round(train_seconds, 1),
            "teacher_forwards": result.teacher_forwards, "startup": startup,
            "final_loss": result.last_metrics.get("loss"), **measured,
        }
        self._write(path, out)
        return out

    def _measure_run(self, run_dir: Path, variant: Variant, seed: int) -> dict[str, Any]:
        from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint, student_from_checkpoint
        from dkdm_cli.teachers.native import load_run_teacher

        student = load_run_teacher(run_dir)
        out: dict[str, Any] = {"parameters": student.num_parameters,
                               "measure": _measure(student, self.scale, seed)}
        if variant.curve:
            curve = []
            for path in list_checkpoints(run_dir)[:-1]:
                ckpt = read_checkpoint(path)
                student.model = student_from_checkpoint(ckpt).eval()
                curve.append({"step": ckpt.step, **_measure(student, self.scale, seed)})
            out["curve"] = curve
        return out

    def _write(self, path: Path, result: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command(variant: Variant, student: str, seed: int, s: Scale, sets: list[str]) -> str:
    teacher = "<dit teacher>" if variant.teacher == "dit-teacher" else variant.teacher
    extra = " ".join(f"--set {x}" for x in sets)
    return (f"dkdm distill --teacher {teacher} --student {student} --iterations {s.iterations} "
            f"--batch-size {s.batch} --seed {seed} {extra}").strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the ~10-minute smoke version")
    ap.add_argument("--tables", default="1,2,3,4,5,6,7")
    ap.add_argument("--seeds", type=int, help="seeds per variant (default: the scale's)")
    ap.add_argument("--startup-seeds", type=int, help="seeds of the start-up table (default: the scale's)")
    ap.add_argument("--iterations", type=int, help="override the scale's iterations")
    ap.add_argument("--samples", type=int, help="override the scale's measured samples")
    ap.add_argument("--work", type=Path, default=ROOT / "study-runs", help="run directories")
    ap.add_argument("--results", type=Path, help="result JSON files (default docs/results/...)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    scale = QUICK if args.quick else FULL
    scale = dataclasses.replace(scale, **{k: v for k, v in (("seeds", args.seeds),
                                ("iterations", args.iterations), ("samples", args.samples),
                                ("startup_seeds", args.startup_seeds)) if v})
    results = args.results or ROOT / "docs" / "results" / ("quick" if args.quick else "study")
    study = Study(scale, args.work, results, args.quick,
                  log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", file=sys.stderr, flush=True))
    default_student = Config().student.name
    tables = [int(t) for t in args.tables.split(",") if t]
    if not args.render_only:
        if args.threads:
            torch.set_num_threads(args.threads)
        for table in tables:
            if table == 7:  # steps against quality: its own models (benchmarks/study_steps.py)
                from study_steps import run_table

                run_table(study, scale.seeds)
                continue
            for variant in variants(default_student, scale.rho)[table]:
                for seed in range(scale.startup_seeds if variant.startup_table else scale.seeds):
                    study.run(table, variant, seed, default_student)
                    study.teacher_result(variant.teacher, seed)
    from study_report import render

    render(study, tables, default_student, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
