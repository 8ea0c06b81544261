"""`dkdm sample` on students: run directories (EMA or raw), exports, --npz for evaluation
suites, and --compare-teacher from the same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dkdm_cli.cli import run
from dkdm_cli.export import export_student
from dkdm_cli.sample import make_grid

ARGS = ["--num", "4", "--steps", "3", "--device", "cpu"]


def _npz(path):
    with np.load(path, allow_pickle=False) as f:
        assert f.files == ["arr_0"]
        return f["arr_0"]


def test_npz_is_what_evaluation_suites_read(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    assert run(["sample", "--model", str(tiny_run_dir), *ARGS, "--npz", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    arr = _npz(out)
    assert arr.dtype == np.uint8 and arr.shape == (4, 8, 8, 1)  # N, H, W, C
    assert record["npz"] == str(out) and record["images_per_second"] > 0


def test_run_dir_ema_by_default_and_no_ema(tiny_run_dir, tmp_path):
    for name, extra in (("ema", []), ("ema2", ["--ema"]), ("raw", ["--no-ema"])):
        assert run(["sample", "--model", str(tiny_run_dir), *ARGS, "--npz",
                    str(tmp_path / f"{name}.npz"), "--quiet", *extra]) == 0
    ema, ema2, raw = (_npz(tmp_path / f"{n}.npz") for n in ("ema", "ema2", "raw"))
    assert np.array_equal(ema, ema2) and not np.array_equal(ema, raw)


def test_export_samples_like_its_run_dir(tiny_run_dir, tmp_path):
    model = tmp_path / "student.safetensors"
    export_student(tiny_run_dir, fmt="safetensors", out=model)
    for name, source in (("run", tiny_run_dir), ("export", model)):
        assert run(["sample", "--model", str(source), *ARGS, "--npz", str(tmp_path / f"{name}.npz"),
                    "--quiet"]) == 0
    assert np.array_equal(_npz(tmp_path / "run.npz"), _npz(tmp_path / "export.npz"))
    assert run(["sample", "--model", str(model), *ARGS, "--npz", str(tmp_path / "x.npz"),
                "--no-ema"]) == 2


@pytest.mark.parametrize("batch", ["4", "3"])  # one batch (samples reused) and two (re-sampled)
def test_compare_teacher_is_teacher_and_student_from_the_same_noise(
        batch, tiny_run_dir, tiny_teacher_file, tmp_path):
    png = tmp_path / "compare.png"
    argv = ARGS + ["--batch-size", batch, "--seed", "5"]
    assert run(["sample", "--model", str(tiny_run_dir), *argv, "--compare-teacher", str(png),
                "--npz", str(tmp_path / "student.npz"), "--quiet"]) == 0
    assert run(["sample", "--teacher", str(tiny_teacher_file), *argv, "--npz",
                str(tmp_path / "teacher.npz"), "--quiet"]) == 0
    pair = np.asarray(Image.open(png))  # (H, W) grey, upscaled 128 // 8 = 16x
    scale = 16
    left = make_grid(_npz(tmp_path / "teacher.npz"))[..., 0].repeat(scale, 0).repeat(scale, 1)
    right = make_grid(_npz(tmp_path / "student.npz"))[..., 0].repeat(scale, 0).repeat(scale, 1)
    assert pair.shape == (left.shape[0], left.shape[1] + 4 * scale + right.shape[1])
    assert np.array_equal(pair[:, : left.shape[1]], left)
    assert np.array_equal(pair[:, -right.shape[1]:], right)


def test_compare_teacher_needs_a_recorded_teacher(tiny_teacher_file, tmp_path, capsys):
    code = run(["sample", "--model", str(tiny_teacher_file), *ARGS, "--compare-teacher",
                str(tmp_path / "c.png")])
    assert code == 2 and "records" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    ([], "nothing to write"),
    (["--npz", "samples.zip"], "must end in .npz"),
])
def test_sample_user_errors(argv, needle, tiny_run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["sample", "--model", str(tiny_run_dir), *ARGS, *argv]) == 2
    assert needle in capsys.readouterr().err


# -- issue 20: absurd guidance and broken models are one line, and nothing is written ---------------

@pytest.mark.parametrize("argv", [
    ["sample", "--teacher", "{teacher}", "--npz", "{tmp}/s.npz"],
    ["eval", "{teacher}", "--consistency"],
])
def test_an_absurd_guidance_scale_is_refused_with_the_useful_range(argv, tiny_cond_teacher_file,
                                                                   tmp_path, capsys):
    argv = [a.format(teacher=tiny_cond_teacher_file, tmp=tmp_path) for a in argv]
    code = run([*argv, *ARGS, "--class", "1", "--cfg", "1e308"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cfg_scale" in err and "<= 50" in err and "1 to 10" in err, err
    assert not (tmp_path / "s.npz").exists()


def test_non_finite_samples_are_refused_in_one_line(tmp_path, capsys):
    from conftest import make_tiny_teacher_file

    from dkdm_cli.models.io import atomic_save_safetensors, read_safetensors

    path = make_tiny_teacher_file(tmp_path / "broken.safetensors")
    tensors, meta = read_safetensors(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() > 1)
    tensors[name] = tensors[name].clone().fill_(float("nan"))  # weights a bad run could leave
    atomic_save_safetensors(tensors, path, meta)
    code = run(["sample", "--teacher", str(path), *ARGS, "--npz", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "non-finite" in err, err
    assert not (tmp_path / "s.npz").exists()
