"""The GPU check cannot rot: its --smoke run (the same script on the CPU, tiny sizes) passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_family_policy_and_case(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "smoke"
    checked = {(f["family"], f["teacher_precision"]) for f in out["families"]}
    families = {"built-in", "adm-pt", "diffusers-unet", "latent-vq", "diffusers-dit-kl", "run-dir"}
    assert checked == {(f, p) for f in families for p in ("fp32", "bf16", "fp16")}
    for f in out["families"]:
        assert f["losses_finite"], f
        assert (f["rel_error_vs_fp32"] == 0) == (f["teacher_precision"] == "fp32"), f
        assert f["rel_error_vs_fp32"] < 0.03, f
    assert [c["case"] for c in out["cases"]] == ["a", "b", "c"]
    for c in out["cases"]:
        assert c["images_per_s"] > 0 and c["iteration_over_parts_median"] > 0
        assert c["gflops_per_iteration"] and c["sampling"]["student_images_per_s"] > 0
    assert out["cases"][0]["runtime"]["compile"] is True  # the compiled path runs here too
