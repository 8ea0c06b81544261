"""`dkdm export`: a model file that loads as teacher and student, ONNX checked by onnxruntime
for a UNet and a DiT student, the model card, and the CLI's choices and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dkdm_cli import export as E
from dkdm_cli.api import load_student
from dkdm_cli.checkpoint import load_latest, student_from_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.models.io import read_model_doc
from dkdm_cli.teachers.spec import resolve_teacher


def _outputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x, t = torch.randn(3, 1, 8, 8, generator=gen), torch.tensor([0.0, 7.0, 19.0])  # (3, 1, 8, 8)
    with torch.no_grad():
        return model(x, t)


def test_safetensors_export_loads_as_teacher_and_as_student(tiny_run_dir, tmp_path):
    out = tmp_path / "ship" / "student.safetensors"
    result = E.export_student(tiny_run_dir, fmt="safetensors", out=out)
    assert out.is_file() and result.step == 12 and result.ema
    doc = read_model_doc(out)
    ckpt = load_latest(tiny_run_dir)
    assert doc["diffusion"] == ckpt.doc["diffusion"] and doc["sample_shape"] == [1, 8, 8]
    assert doc["teacher"] == {"spec": ckpt.doc["teacher"]}
    assert "autoencoder_from" not in doc  # a pixel teacher has none
    ema_model = student_from_checkpoint(ckpt, ema=True).eval()
    as_teacher = resolve_teacher(str(out))
    as_student = load_student(out)
    assert as_teacher.sample_shape == (1, 8, 8) and as_teacher.learn_sigma
    torch.testing.assert_close(_outputs(as_teacher.model), _outputs(ema_model), rtol=0, atol=0)
    torch.testing.assert_close(_outputs(as_student.model), _outputs(ema_model), rtol=0, atol=0)
    card = (out.parent / "README.md").read_text()
    assert card.startswith(E.CARD_MARKER)
    assert "| step | 12 |" in card and '"loss": 0.25' in card  # the last metrics.jsonl record
    assert "[student]" in card and ckpt.doc["teacher"] in card


@pytest.mark.slow
@pytest.mark.parametrize("run_fixture", ["tiny_run_dir", "tiny_dit_run_dir"])
def test_onnx_export_matches_pytorch(run_fixture, request, tmp_path):
    import onnx
    import onnxruntime

    run_dir = request.getfixturevalue(run_fixture)
    out = tmp_path / f"{run_fixture}.onnx"
    result = E.export_student(run_dir, fmt="onnx", out=out)
    assert result.max_abs_diff is not None and result.max_abs_diff <= E.ONNX_TOLERANCE
    assert result.exporter.startswith("torch.onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["dkdm"])["sample_shape"] == [1, 8, 8]
    # A batch size the check did not use: the batch axis is dynamic.
    model = student_from_checkpoint(load_latest(run_dir), ema=True).eval()
    x, t = torch.randn(5, 1, 8, 8), torch.linspace(0, 19, 5)
    got = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["output"], {"x": x.numpy(), "t": t.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x, t).numpy()).max() <= E.ONNX_TOLERANCE
    assert "ONNX check" in (tmp_path / "README.md").read_text()


@pytest.mark.slow
def test_onnx_mismatch_is_an_error_and_leaves_nothing(tiny_dit_run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(E, "check_onnx", lambda *a, **k: 0.5)
    out = tmp_path / "bad.onnx"
    with pytest.raises(E.ExportCheckError, match="differs from PyTorch"):
        E.export_student(tiny_dit_run_dir, fmt="onnx", out=out)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_json_format_from_suffix_and_raw_weights(tiny_run_dir, tmp_path, capsys):
    out = tmp_path / "raw.safetensors"
    assert run(["export", "--run-dir", str(tiny_run_dir), "--out", str(out), "--no-ema",
                "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["format"] == "safetensors" and record["ema"] is False
    raw = student_from_checkpoint(load_latest(tiny_run_dir), ema=False).eval()
    torch.testing.assert_close(_outputs(load_student(out).model), _outputs(raw), rtol=0, atol=0)


def test_cli_export_default_path_and_foreign_readme_is_kept(tiny_dit_run_dir, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dit_run_dir, run_dir)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "README.md").write_text("mine\n")
    assert run(["export", "--run-dir", str(run_dir), "--quiet"]) == 0
    assert (run_dir / "export" / "run.safetensors").is_file()
    assert (run_dir / "export" / "README.md").read_text() == "mine\n"
    assert (run_dir / "export" / "run.README.md").read_text().startswith(E.CARD_MARKER)


@pytest.mark.parametrize("argv, needle", [
    (["--format", "onnx", "--out", "x.safetensors"], "must end in .onnx"),
    (["--format", "tflite"], "tflite"),
])
def test_cli_export_user_errors(argv, needle, tiny_run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["export", "--run-dir", str(tiny_run_dir), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_cli_export_run_without_checkpoint(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert run(["export", "--run-dir", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
