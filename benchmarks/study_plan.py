"""What the study runs: its scales, variants and tables, shared by benchmarks/study.py (which
runs them) and benchmarks/study_report.py (which writes them up), so neither imports the other."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dkdm_cli.config import Config

TEACHER = "digits"
COND_TEACHER = "digits-cond"
CFG_MEASURED = 3.0  # table 6 also measures class consistency at this guidance scale


@dataclass(frozen=True)
class Scale:
    """How big every run is."""

    iterations: int
    batch: int
    samples: int  # images measured per run (and per curve point)
    steps: int  # sampling steps (IDDPM, respaced) for every measured model, teacher included
    seeds: int
    curve_points: int  # checkpoints measured along each size variant's run
    dit_teacher_iterations: int
    grid: int = 16  # teacher/student pairs in the side-by-side grids
    rho: float | None = None  # every run's pool factor (None: the default config's)
    startup_rho: float = 0.01  # table 4's pool (both rows): the exact start-up costs ~N*T/2
    startup_seeds: int = 2

    def per_run(self) -> dict[str, Any]:
        """What one run's result depends on: not how many seeds or grid pairs the study has, so
        adding a seed later reuses every result already made."""
        out = dataclasses.asdict(self)
        for key in ("seeds", "startup_seeds", "grid"):
            out.pop(key)
        return out


# Sized for ~3 hours of the 2-core CPU (docs/results.md says what this cut): half the default
# run's batch and iterations, 500 samples per measurement, 2 seeds.
FULL = Scale(iterations=800, batch=32, samples=500, steps=50, seeds=2, curve_points=4,
             dit_teacher_iterations=4000)
QUICK = Scale(iterations=40, batch=16, samples=64, steps=10, seeds=1, curve_points=2,
              dit_teacher_iterations=40, grid=8, rho=0.01, startup_rho=0.005, startup_seeds=1)


@dataclass(frozen=True)
class Variant:
    """One configuration of the study (run once per seed)."""

    name: str
    label: str
    teacher: str = TEACHER  # a registered teacher (TEACHER, COND_TEACHER) or "dit-teacher"
    student: str = ""  # "" = the default student
    sets: tuple[str, ...] = ()  # --set overrides
    curve: bool = False
    startup_table: bool = False  # runs at the scale's startup_rho and startup_seeds


DIT_STUDENT = "dit-n/2"  # the DiT student of tables 3 and 5 (0.33M, the size of the default UNet)
DIT_TEACHER_ARCH = "dit-t/2"  # the DiT digits teacher of table 3 (1.3M; trained by the study)


def variants(default_student: str, rho: float | None = None) -> dict[int, list[Variant]]:
    """The variants of each table. A Variant object shared by tables is one run per seed: the
    default DKDM run is table 1's dynamic row, table 2's DKDM row, table 3's CNN -> CNN and
    table 5's default size (its checkpoints along the way give the curve)."""
    d = Config().distill
    rho = rho or d.rho
    dkdm = Variant("dynamic", f"DKDM (dynamic, rho {rho:g})", curve=True)
    dit_student = Variant("size-dit", f"{DIT_STUDENT} (DiT)", student=DIT_STUDENT, curve=True)
    return {
        1: [Variant("basic", "basic", sets=("distill.mode=basic",)),
            Variant("shuffle", "+ shuffle", sets=("distill.mode=shuffle",)),
            dkdm,
            Variant("dynamic-rho4x", f"DKDM (dynamic, rho {4 * rho:g})",
                    sets=(f"distill.rho={4 * rho}",))],
        2: [dkdm,
            Variant("synthetic", "synthetic baseline (equal teacher forwards)",
                    sets=("distill.mode=synthetic", 'distill.synthetic_samples="auto"')),
            Variant("data", "data-driven (real digits, not data-free)",
                    sets=("distill.mode=data",))],
        3: [dataclasses.replace(dkdm, label=f"CNN -> CNN ({default_student})"),
            dataclasses.replace(dit_student, label=f"CNN -> DiT ({DIT_STUDENT})"),
            Variant("dit-cnn", f"DiT -> CNN ({default_student})", teacher="dit-teacher"),
            Variant("dit-dit", f"DiT -> DiT ({DIT_STUDENT})", teacher="dit-teacher",
                    student=DIT_STUDENT)],
        4: [Variant("init-default", f"default start-up ({Config().distill.init})",
                    startup_table=True),
            Variant("init-exact", "exact start-up", sets=("distill.init=exact",),
                    startup_table=True)],
        5: [dataclasses.replace(dkdm, label=f"{default_student} (default)"),
            dit_student,
            Variant("size-unet-t", "unet-t (the teacher's architecture)", student="unet-t",
                    curve=True)],
        6: [Variant("cond", f"{COND_TEACHER} -> {default_student}", teacher=COND_TEACHER)],
    }


# -- speed --------------------------------------------------------------------------------------

def sampling_speed(specs: dict[str, str], *, rounds: int = 5, batch: int = 64, steps: int = 10) -> dict:
    """img/s of each model with the same sampler and steps, in alternating rounds, on one thread."""
    from bench_speedup import sampling_speeds

    return sampling_speeds(specs, rounds=rounds, num=batch, batch=batch, steps=steps, threads=1)
