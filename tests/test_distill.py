"""The distillation engine: runs, resume, faults, counts."""

from __future__ import annotations

import json

import torch
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint
from dkdm_cli.cli import run


def _weights(run_dir, step):
    ckpt = read_checkpoint(run_dir / "checkpoints" / f"ckpt-{step:08d}.safetensors")
    return ckpt.group("student"), ckpt.group("ema"), ckpt


def test_distill_writes_run_dir(tiny_teacher_file, tmp_path, capsys):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=6) + ["--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1]["event"] == "end" and lines[-1]["status"] == "completed" and lines[-1]["step"] == 6
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for key in ("loss", "mse", "kl", "lr", "grad_norm", "it_per_s", "images_per_s", "loss_t_q1"):
        assert key in records[-1]
    assert records[-1]["kl"] is not None  # both teacher and student learn a variance
    assert (rd / "config.resolved.toml").is_file()
    startup = json.loads((rd / "startup.json").read_text())
    # N = ceil(0.1 * 20 * 4) = 8 states; fast init costs at most 3 teacher steps each.
    assert startup["pool_size"] == 8 and 0 < startup["teacher_forwards"] <= 8 * 3
    assert [p.name for p in list_checkpoints(rd)] == ["ckpt-00000003.safetensors",
                                                      "ckpt-00000006.safetensors"]


def test_resume_is_bit_exact(tiny_teacher_file, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(tiny_distill_args(tiny_teacher_file, straight, iterations=7)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=3)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=7)) == 0
    s1, e1, c1 = _weights(straight, 7)
    s2, e2, c2 = _weights(split, 7)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
        assert torch.equal(e1[k], e2[k]), k
    assert torch.equal(c1.tensors["pool/x"], c2.tensors["pool/x"])
    # And the run stops exactly at the total: running again does nothing.
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=7)) == 0
    assert _weights(split, 7)[2].step == 7


def test_resume_without_pool_warns_and_reinitialises(tiny_teacher_file, tmp_path, capsys):
    rd = tmp_path / "run"
    extra = ["--set", "distill.save_pool=false"]
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=extra)) == 0
    assert not read_checkpoint(list_checkpoints(rd)[-1]).has_pool
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=5, extra=extra)) == 0
    assert "rebuilt" in capsys.readouterr().err


def test_other_config_refused_unless_force(tiny_teacher_file, tmp_path, capsys):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3)) == 0
    code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=["--lr", "0.01"]))
    err = capsys.readouterr().err
    assert code == 2 and "different configuration" in err and "distill.lr" in err
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=["--lr", "0.01", "--force"])) == 0
    assert read_checkpoint(list_checkpoints(rd)[-1]).doc["config"]["distill"]["lr"] == 0.01


def test_corrupt_checkpoint_falls_back(tiny_teacher_file, tmp_path, capsys):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=6)) == 0
    newest = list_checkpoints(rd)[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=6)) == 0
    err = capsys.readouterr().err
    assert "ckpt-00000006" in err and "falling back" in err
    assert read_checkpoint(list_checkpoints(rd)[-1]).step == 6  # redone from step 3


def test_disk_full_keeps_previous_checkpoint(tiny_teacher_file, tmp_path, monkeypatch, capsys):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3)) == 0
    before = list_checkpoints(rd)[-1].read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("dkdm_cli.models.io.save_file", full)
    code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=6))
    err = capsys.readouterr().err
    assert code == 1 and "no space left" in err.lower() and "intact" in err
    assert [p.name for p in list_checkpoints(rd)] == ["ckpt-00000003.safetensors"]
    assert list_checkpoints(rd)[-1].read_bytes() == before
    assert not [p for p in (rd / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_last_good(tmp_path, capsys):
    from conftest import make_tiny_teacher_file
    from safetensors.torch import load_file, save_file

    bad = make_tiny_teacher_file(tmp_path / "nan.safetensors")
    tensors = load_file(str(bad))
    from safetensors import safe_open

    with safe_open(str(bad), "pt") as fh:
        meta = fh.metadata()
    key = next(k for k in tensors if k.startswith("out.2.weight"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(bad), metadata=meta)
    rd = tmp_path / "run"
    code = run(tiny_distill_args(bad, rd, iterations=4))
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err
    assert list_checkpoints(rd) == []


def test_teacher_forwards_once_per_iteration(tiny_teacher_file, tmp_path):
    from dkdm_cli.config import load_config
    from dkdm_cli.distill import engine
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher(str(tiny_teacher_file))
    calls = []
    original = teacher.model.forward

    def counting(x, t):
        calls.append(x.shape[0])
        return original(x, t)

    teacher.model.forward = counting
    args = tiny_distill_args(tiny_teacher_file, tmp_path / "r", iterations=5)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(None, sets=sets + [f'teacher.name="{tiny_teacher_file}"', "distill.batch_size=4",
                                         "distill.iterations=5", f'distill.run_dir="{tmp_path / "r"}"'],
                      search_cwd=False)
    from dkdm_cli.distill import pool as pool_module

    original_init = pool_module.init_pool
    startup = []

    def init_then_reset(**kw):
        pool = original_init(**kw)
        startup.append(sum(calls))
        calls.clear()  # count only the training iterations
        return pool

    pool_module.init_pool = init_then_reset
    try:
        result = engine.distill(cfg, quiet=True, teacher=teacher)
    finally:
        pool_module.init_pool = original_init
    assert result.step == 5
    assert calls == [4] * 5
    assert result.teacher_forwards == startup[0] + 5 * 4  # what is reported is what was spent


def test_modes_and_synthetic_baseline(tiny_fixed_teacher_file, tmp_path):
    for mode in ("basic", "shuffle", "synthetic"):
        rd = tmp_path / mode
        extra = ["--mode", mode, "--set", "distill.synthetic_samples=8", "--set",
                 "distill.synthetic_steps=4"]
        assert run(tiny_distill_args(tiny_fixed_teacher_file, rd, iterations=3, extra=extra)) == 0, mode
        ckpt = read_checkpoint(list_checkpoints(rd)[-1])
        assert ckpt.step == 3
        if mode == "synthetic":
            assert ckpt.tensors["synthetic/x"].shape == (8, 1, 8, 8)
        else:
            assert ckpt.tensors["pool/x"].shape == (4, 1, 8, 8)  # pool = batch
    # A fixed-variance teacher trains a student without a variance output: L_simple* only.
    records = [json.loads(x) for x in (tmp_path / "basic" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kl"] is None


def test_student_that_cannot_fit_is_a_user_error(tiny_teacher_file, tmp_path, capsys):
    code = run(["distill", "--teacher", str(tiny_teacher_file), "--student", "dit-t/4",
                "--set", "student.kwargs={patch_size=3}", "--run-dir", str(tmp_path / "r"), "--quiet"])
    assert code == 2 and "patch size 3 does not divide" in capsys.readouterr().err
