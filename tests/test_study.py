"""benchmarks/study.py end to end on a tiny configuration: runs, result files, the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_study(tmp_path, monkeypatch, tables: str):
    """(the study module, argv of a --quick run of `tables` writing under tmp_path)."""
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("study", None)
    import study

    return study, ["--quick", "--tables", tables, "--iterations", "2", "--samples", "16",
                   "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
                   "--doc", str(tmp_path / "docs" / "results.md")]


@pytest.mark.slow
def test_study_quick_runs_resumes_and_reports(tmp_path, monkeypatch):
    study, argv = _quick_study(tmp_path, monkeypatch, "1,2")
    assert study.main(argv) == 0
    results = sorted((tmp_path / "results").glob("run-*.json"))
    names = {json.loads(p.read_text())["variant"] for p in results}
    assert names == {"basic", "shuffle", "dynamic", "dynamic-rho4x", "synthetic", "data"}
    run = json.loads(next(p for p in results if "run-synthetic" in p.name).read_text())
    assert run["measure"]["num"] == 16 and run["teacher_forwards"] > 0 and run["command"]
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "## 1. Ablation" in doc and "## 2. Baselines" in doc
    table1 = doc.split("## 1. Ablation")[1].split("## 2.")[0]
    for label in ("| basic |", "| + shuffle |", "| DKDM (dynamic"):
        assert label in table1
    assert "Order (Frechet, lower is better):" in table1 and "(1)" in table1
    # A second call finds every result and runs nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in results}
    assert study.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in results} == stamps


@pytest.mark.slow
def test_study_table_6_measures_class_consistency(tmp_path, monkeypatch):
    from dkdm_cli.teachers.builtin import builtin_weights

    if not builtin_weights("digits-cond").is_file():
        pytest.skip("the digits-cond weights are absent")
    study, argv = _quick_study(tmp_path, monkeypatch, "6")
    assert study.main(argv) == 0
    run = json.loads(next((tmp_path / "results").glob("run-cond-*.json")).read_text())
    teacher = json.loads(next((tmp_path / "results").glob("teacher-digits-cond-*.json")).read_text())
    for m in (run["measure"], teacher["measure"]):
        assert 0 <= m["consistency"] <= 1 and 0 <= m["consistency_cfg3"] <= 1
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "## 6. Class-conditional teacher" in doc and "class consistency" in doc


@pytest.mark.slow
def test_study_table_7_sweeps_steps_for_three_models(tmp_path, monkeypatch):
    study, argv = _quick_study(tmp_path, monkeypatch, "7")
    assert study.main(argv) == 0
    results = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
               for p in (tmp_path / "results").glob("t7-*-s0.json")}
    assert set(results) == {"teacher", "dkdm", "fast"}
    assert set(results["teacher"]["frechet"]) == {"iddpm", "ddim", "dpm-solver++"}
    assert set(results["fast"]["frechet"]) == {"consistency"}
    assert (tmp_path / "results" / "t7-speed.json").is_file()
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "## 7. Sampling steps" in doc and "few-step student (unet-n" in doc
    assert (tmp_path / "results" / "t7-grid.png").is_file() and "t7-grid.png" in doc
