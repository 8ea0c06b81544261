"""Every mode's batch source: exact resume, teacher-forward accounting, the compute-matched
synthetic baseline and the data-driven reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.config import Mode, load_config
from dkdm_cli.distill.sources import dkdm_forwards, synthetic_plan


def _images(n: int = 12, size: int = 8, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


@pytest.fixture
def digits_npz(tmp_path):
    path = tmp_path / "real.npz"
    np.savez(path, arr_0=_images())
    return path


@pytest.fixture
def digits_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "real"
    folder.mkdir()
    for i, img in enumerate(_images()):
        Image.fromarray(img[..., 0]).save(folder / f"{i:03d}.png")
    return folder


def _mode_args(mode: str, data) -> list[str]:
    extra = ["--mode", mode, "--set", "distill.synthetic_samples=8", "--set", "distill.synthetic_steps=4"]
    if mode == "data":
        extra += ["--set", f'distill.data="{data}"']
    return extra


@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_resume_is_bit_exact_in_every_mode(mode, tiny_teacher_file, tmp_path, digits_npz):
    extra = _mode_args(mode, digits_npz)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(tiny_distill_args(tiny_teacher_file, straight, iterations=5, extra=extra)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=3, extra=extra)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=5, extra=extra)) == 0
    a, b = (read_checkpoint(list_checkpoints(d)[-1]) for d in (straight, split))
    assert a.step == b.step == 5
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_teacher_forwards_are_reported_in_every_mode(tiny_teacher_file, tmp_path, digits_npz, capsys):
    for mode, per_iteration in (("dynamic", 4), ("synthetic", 0), ("data", 0)):
        rd = tmp_path / mode
        args = tiny_distill_args(tiny_teacher_file, rd, iterations=4, extra=_mode_args(mode, digits_npz))
        assert run([a for a in args if a != "--quiet"] + ["--json"]) == 0
        end = json.loads(capsys.readouterr().out.splitlines()[-1])
        startup = json.loads((rd / "startup.json").read_text())
        records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
        assert end["teacher_forwards"] == startup["teacher_forwards"] + 4 * per_iteration, mode
        assert records[-1]["teacher_forwards"] == end["teacher_forwards"]
        if mode == "synthetic":
            assert startup["teacher_forwards"] == 8 * 4  # 8 samples x 4 ancestral steps
        if mode == "data":
            assert startup["teacher_forwards"] == 0 and startup["images"] == 12


def test_auto_synthetic_matches_a_dkdm_run_within_5_percent(tiny_teacher_file, tmp_path, capsys):
    common = ["--set", "distill.synthetic_steps=3", "--set", "distill.rho=0.5"]
    runs = {}
    for mode in ("dynamic", "synthetic"):
        args = tiny_distill_args(tiny_teacher_file, tmp_path / mode, iterations=12,
                                 extra=["--mode", mode, *common])
        assert run([a for a in args if a != "--quiet"] + ["--json"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out.splitlines()[-1])["teacher_forwards"]
    assert runs["synthetic"] == pytest.approx(runs["dynamic"], rel=0.05)


def test_auto_plan_is_the_dkdm_budget_and_a_number_is_obeyed():
    cfg = load_config(None, sets=["distill.synthetic_steps=50"], search_cwd=False).distill
    plan = synthetic_plan(cfg, 1000)
    budget = dkdm_forwards(cfg, 1000)
    assert plan["target_forwards"] == budget
    assert abs(plan["samples"] * 50 - budget) <= 25
    fixed = load_config(None, sets=["distill.synthetic_samples=100"], search_cwd=False).distill
    assert synthetic_plan(fixed, 1000)["samples"] == 100


def test_data_mode_trains_from_a_folder(tiny_teacher_file, tmp_path, digits_folder):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3,
                                 extra=_mode_args("data", digits_folder))) == 0
    ckpt = read_checkpoint(list_checkpoints(rd)[-1])
    assert ckpt.step == 3 and "synthetic/x" not in ckpt.tensors and "rng/data" in ckpt.tensors


def test_data_mode_reads_images_exactly(digits_npz, digits_folder):
    from dkdm_cli.distill.realdata import load_images

    a = load_images(str(digits_npz), (1, 8, 8))
    b = load_images(str(digits_folder), (1, 8, 8))
    assert a.shape == (12, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    raw = torch.from_numpy(_images()[..., 0]).float()
    assert torch.allclose((a[:, 0] + 1) * 127.5, raw)


@pytest.mark.parametrize("data,expected", [
    ("", "needs distill.data"),
    ("{tmp}/missing.npz", "no such folder or .npz"),
    ("{big}", "resize them first"),
])
def test_data_mode_refuses_bad_data_before_the_run_starts(tiny_teacher_file, tmp_path, data,
                                                          expected, capsys):
    big = tmp_path / "big.npz"
    np.savez(big, arr_0=_images(size=16))
    rd = tmp_path / "run"
    extra = ["--mode", "data", "--set", f'distill.data="{data.format(tmp=tmp_path, big=big)}"']
    code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=extra))
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not list_checkpoints(rd)


@pytest.mark.parametrize("damage,expected", [
    ("garbage", "not a readable image"),
    ("truncated", "not a readable image"),
    ("other-size", "differs from the first image's"),
])
def test_data_mode_checks_every_image_before_the_run_directory(tiny_teacher_file, tmp_path,
                                                               digits_folder, damage, expected,
                                                               capsys):
    from PIL import Image

    bad = digits_folder / "007.png"  # one image among twelve, not the first
    if damage == "garbage":
        bad.write_bytes(b"not a png at all")
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-30])  # valid header, chunks cut short
    else:
        Image.fromarray(_images(1, size=10)[0, ..., 0]).save(bad)
    rd = tmp_path / "run"
    extra = ["--mode", "data", "--set", f'distill.data="{digits_folder}"']
    code = run(tiny_distill_args(tiny_teacher_file, rd, iterations=3, extra=extra))
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "007.png" in err and len(err.splitlines()) == 1, err
    assert not rd.exists()  # refused before anything in the run directory was written
