"""Multi-process distillation through torchrun on the CPU gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo(tiny_teacher_file, tmp_path):
    rd = tmp_path / "run"
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=4)
    args = [a if a != "--quiet" else "--json" for a in args] + ["--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dkdm_cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    # Only rank 0 prints and writes.
    ends = [x for x in lines if x.get("event") == "end"]
    assert len(ends) == 1
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4]
    # images/s counts both ranks' batches.
    assert all(r["images_per_s"] == pytest.approx(r["it_per_s"] * 8) for r in records)
    ckpt = read_checkpoint(list_checkpoints(rd)[-1])
    assert ckpt.step == 4
    assert not ckpt.has_pool  # per-rank pools are not stored; resume re-initialises them
