"""docs/results.md and its figures from the study's result files (see benchmarks/study.py).

Tables give the mean and the sample standard deviation over seeds ("mean ± sd (n)"); a claim is
marked as holding only where the means differ by more than the larger spread. A hand-written
discussion, if present at docs/results/discussion.md, is included as it is.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

PAPER = {1: "CIFAR-10 FID: basic ~13.5, + shuffle ~11.2, + dynamic 9.56",
         2: "CIFAR-10 FID: DKDM 9.56, data-free synthetic 12.06, data-driven 7.84",
         3: "CIFAR-10 FID: CNN->CNN 9.56, CNN->ViT 17.11, ViT->CNN 13.17",
         4: "the paper's start-up is the exact chain (shuffle denoise)",
         5: "(no table: why users distill)",
         6: "(none: the paper leaves class-conditional models to future work)"}
TITLES = {1: "Ablation: basic, shuffle, dynamic", 2: "Baselines at equal teacher compute",
          3: "Cross-architecture", 4: "Start-up: default vs exact", 5: "Student sizes",
          6: "Class-conditional teacher"}
STEPS_TITLE = "Sampling steps: the teacher, the DKDM student and the few-step student"
STEPS_GOAL = ("a 4-step unet-n student better than the teacher's best 8-step sampler; goal 4 steps "
              "within 1.5x of the teacher's 50-step IDDPM, at >= 20x its images/s")


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    return mean, sd, n


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, sd, n = _stats(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} ({n})" if n > 1 else f"{mean:.{digits}f} (1)"


def load_results(study) -> tuple[dict[str, list[dict]], dict[tuple[str, int], dict]]:
    """Runs of this scale by variant, and teacher figures by (teacher, seed)."""
    scale = study.scale.per_run()
    runs: dict[str, list[dict]] = defaultdict(list)
    teachers: dict[tuple[str, int], dict] = {}
    for path in sorted(Path(study.results).glob("*.json")):
        data = json.loads(path.read_text())
        if path.name.startswith("run-") and data.get("scale") == scale:
            runs[data["variant"]].append(data)
        elif path.name.startswith("teacher-") and data.get("samples") == study.scale.samples \
                and data.get("steps") == study.scale.steps:
            teachers[(data["teacher"], data["seed"])] = data
    return runs, teachers


def _ratio(run: dict, teachers) -> float | None:
    t = teachers.get((run["teacher"], run["seed"]))
    return run["measure"]["frechet"] / t["measure"]["frechet"] if t else None


def table_rows(variants, runs, teachers) -> list[dict[str, Any]]:
    """One row per variant with the per-seed values kept for the claims."""
    rows = []
    for v in variants:
        rs = runs.get(v.name, [])
        ratios = [r for r in (_ratio(x, teachers) for x in rs) if r is not None]
        rows.append({
            "variant": v, "runs": rs,
            "frechet": [x["measure"]["frechet"] for x in rs],
            "confident": [x["measure"]["confident"] for x in rs],
            "balance": [x["measure"]["balance"] for x in rs],
            "ratio": ratios,
            "params": rs[0]["parameters"] if rs else None,
            "forwards": [x["teacher_forwards"] for x in rs],
            "seconds": [x["train_seconds"] for x in rs],
            "student": rs[0]["student"] if rs else v.student,
        })
    return rows


def _markdown_table(rows, extra_cols=()) -> str:
    head = ["variant", "student (params)", "confident", "balance", "Frechet", "ratio to teacher",
            "teacher forwards", "train s", *[c for c, _ in extra_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = f"{r['params'] / 1e6:.2f}M" if r["params"] else "-"
        forwards = f"{statistics.fmean(r['forwards']):,.0f}" if r["forwards"] else "-"
        cells = [r["variant"].label, f"{r['student']} ({params})", _fmt(r["confident"], 3),
                 _fmt(r["balance"], 3), _fmt(r["frechet"]), _fmt(r["ratio"]), forwards,
                 f"{statistics.fmean(r['seconds']):.0f}" if r["seconds"] else "-",
                 *[fn(r) for _, fn in extra_cols]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def order_claim(rows, names: list[str]) -> str:
    """Whether Frechet falls along `names` (each step beyond the larger of the two spreads)."""
    by = {r["variant"].name: r for r in rows}
    parts = []
    for a, b in itertools.pairwise(names):
        fa, fb = by[a]["frechet"], by[b]["frechet"]
        if not fa or not fb:
            return "not measured yet"
        (ma, sa, na), (mb, sb, nb) = _stats(fa), _stats(fb)
        if min(na, nb) < 2:
            verdict = f"{'lower' if mb < ma else 'not lower'} (one seed: no spread to judge by)"
        elif ma - mb > max(sa, sb):
            verdict = "better"
        elif mb - ma > max(sa, sb):
            verdict = "WORSE"
        else:
            verdict = "no clear difference"
        parts.append(f"{by[b]['variant'].label} vs {by[a]['variant'].label}: {verdict} "
                     f"({mb:.2f} vs {ma:.2f})")
    return "; ".join(parts)


def render(study, tables: list[int], default_student: str, doc: Path) -> None:
    """Write `doc` (and figures beside it) from every result of the study's scale."""
    from study_plan import variants

    runs, teachers = load_results(study)
    table_variants = variants(default_student, study.scale.rho)
    figdir = doc.parent / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    s = study.scale
    out = ["# Results: the paper's claims at small scale",
           "",
           "Generated by `benchmarks/study.py` (do not edit by hand; the discussion comes from "
           "`docs/results/discussion.md`). Teacher: the built-in `digits` (unet-t, 0.68M "
           "parameters, 16x16x1, cosine T = 1000). Measure: the project's digits measure of the "
           f"EMA student's samples ({s.samples} samples, IDDPM {s.steps} steps), and the ratio "
           "of its Frechet distance to the teacher's own at the same sampler, steps, seed and "
           "count. Cells are mean ± sample sd (number of seeds).",
           "",
           f"Scale: {s.iterations} iterations at batch {s.batch}; {s.seeds} seeds (the start-up "
           f"table: {s.startup_seeds}, at rho {s.startup_rho}). Each run's result file (with the "
           f"exact command and commit) is in `{Path(study.results).relative_to(doc.parent.parent)}`.",
           ""]
    discussion = doc.parent / "results" / "discussion.md"
    if discussion.is_file():
        out += [discussion.read_text().strip(), ""]
    teacher_rows = sorted(teachers.values(), key=lambda t: (t["teacher"], t["seed"]))
    if teacher_rows:
        out += ["## The teachers", "", "| teacher | params | seed | confident | balance | Frechet |",
                "|---|---|---|---|---|---|"]
        for t in teacher_rows:
            m = t["measure"]
            out.append(f"| {t['teacher']} | {t['parameters'] / 1e6:.2f}M | {t['seed']} | "
                       f"{m['confident']:.3f} | {m['balance']:.3f} | {m['frechet']:.2f} |")
        out.append("")
    for table in tables:
        if table == 7:
            from study_steps import report

            out += [f"## 7. {STEPS_TITLE}", "", f"Issue 21: {STEPS_GOAL}.", "", *report(study, doc)]
            continue
        rows = table_rows(table_variants[table], runs, teachers)
        out += [f"## {table}. {TITLES[table]}", "", f"Paper: {PAPER[table]}.", ""]
        extra = ()
        if table == 5:
            extra = _size_columns(study, rows)
        if table == 6:
            extra = _consistency_columns(rows, teachers)
        out += [_markdown_table(rows, extra), ""]
        if table == 1:
            order = order_claim(rows, ["basic", "shuffle", "dynamic"])
            out += [f"Order (Frechet, lower is better): {order}.", ""]
        if table == 2:
            out += [f"Order: {order_claim(rows, ['synthetic', 'dynamic', 'data'])}.", ""]
        commands = sorted({r["runs"][0]["command"] + f"  # commit {r['runs'][0]['commit']}"
                           for r in rows if r["runs"]})
        if commands:
            out += ["Commands (seed 0; other seeds change `--seed`):", "", "```",
                    *commands, "```", ""]
        if table == 5:
            fig = _curve_figure(rows, figdir / "curves.png")
            if fig:
                out += [f"![Frechet vs iterations]({fig.relative_to(doc.parent)})", ""]
    grid = _grids(study, runs, figdir, default_student)
    if grid:
        out += ["## Teacher (left) and students (right) from the same noise", "",
                *[f"![{name}]({p.relative_to(doc.parent)})" for name, p in grid], ""]
    doc.write_text("\n".join(out))


def _consistency_columns(rows, teachers):
    """Class consistency of the student, unguided and guided, with the teacher's in brackets."""
    from study_plan import CFG_MEASURED

    def column(key: str):
        def cell(r) -> str:
            mine = [x["measure"][key] for x in r["runs"] if key in x["measure"]]
            theirs = [t["measure"][key] for x in r["runs"]
                      if (t := teachers.get((x["teacher"], x["seed"]))) and key in t["measure"]]
            return f"{_fmt(mine, 3)} (teacher {_fmt(theirs, 3)})" if mine else "-"
        return cell

    g = f"{CFG_MEASURED:g}"
    return (("class consistency", column("consistency")),
            (f"consistency at cfg {g}", column(f"consistency_cfg{g}")),
            (f"Frechet at cfg {g}", column(f"frechet_cfg{g}")))


def _size_columns(study, rows):
    from dkdm_cli.models.summary import summarize

    speeds = _speeds(study, rows)

    def gflops(r):
        s = summarize(r["student"], image_size=16, channels=1)
        return f"{s.gflops:.3f}" if s.gflops is not None else "-"

    def speed(r):
        v = speeds.get(r["student"])
        t = speeds.get("teacher")
        return f"{v:.0f} ({v / t:.1f}x)" if v and t else "-"

    return (("GFLOPs", gflops), ("img/s (x teacher)", speed))


def _speeds(study, rows) -> dict[str, float]:
    """Sampling img/s of the teacher and each size's seed-0 student, measured side by side
    (cached in the results folder with the run it belongs to)."""
    from study_plan import sampling_speed

    path = Path(study.results) / "speed.json"
    specs = {"teacher": "digits"}
    specs.update({r["student"]: r["runs"][0]["run_dir"] for r in rows if r["runs"]})
    if path.is_file():
        cached = json.loads(path.read_text())
        if set(cached.get("models", {})) >= set(specs):
            return cached["models"]
    if not all(Path(v).exists() or v == "digits" for v in specs.values()):
        return {}
    speeds = sampling_speed(specs)
    path.write_text(json.dumps({"models": speeds, "method": "median of 5 alternating rounds, "
                                "64 images x 10 IDDPM steps, 1 thread"}, indent=1) + "\n")
    return speeds


def _curve_figure(rows, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    plotted = False
    for r in rows:
        points: dict[int, list[float]] = defaultdict(list)
        for run in r["runs"]:
            for c in run.get("curve", []):
                points[c["step"]].append(c["frechet"])
            points[run["scale"]["iterations"]].append(run["measure"]["frechet"])
        if points:
            steps = sorted(points)
            ax.plot(steps, [statistics.fmean(points[k]) for k in steps], marker="o",
                    label=r["variant"].label)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("iteration")
    ax.set_ylabel("digits Frechet (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _grids(study, runs, figdir: Path, default_student: str) -> list[tuple[str, Path]]:
    """Teacher vs student grids from the same noise, for a few seed-0 students."""
    from dkdm_cli.sample import compare_with_teacher, initial_noise, save_comparison
    from dkdm_cli.teachers.native import load_run_teacher
    from dkdm_cli.teachers.spec import resolve_teacher

    out = []
    for name in ("dynamic", "size-dit", "size-unet-t", "dit-dit", "cond"):
        seed0 = [r for r in runs.get(name, []) if r["seed"] == 0 and r.get("run_dir")]
        path = figdir / f"grid-{name}.png"
        if not seed0 or not Path(seed0[0]["run_dir"]).is_dir():
            if seed0 and path.is_file():  # the run directory is gone: keep the figure made from it
                out.append((f"{name}: {seed0[0]['student']}", path))
            continue
        student = load_run_teacher(Path(seed0[0]["run_dir"]))
        teacher = resolve_teacher(study.teacher_spec(seed0[0]["teacher"]))
        noise = initial_noise(study.scale.grid, tuple(teacher.sample_shape), seed=0)
        t_img, s_img = compare_with_teacher(student, teacher, noise=noise, steps=study.scale.steps,
                                            sampler="iddpm", eta=0.0, seed=0, batch_size=64,
                                            device="cpu")
        save_comparison(t_img, s_img, path, scale=4)
        out.append((f"{name}: {seed0[0]['student']}", path))
    return out
