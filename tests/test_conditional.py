"""Class-conditional teachers and students: labels in the pool (drawn, kept through a chain,
redrawn on restart, checkpointed, resumed exactly), the classifier-free-guidance targets, the
student's label table, sampling with --class / --cfg, and class consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_teacher_file, tiny_distill_args

from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.config import DistillConfig, load_config
from dkdm_cli.diffusion.guidance import guide, guided
from dkdm_cli.distill.engine import build_student
from dkdm_cli.distill.pool import LabelPlan, StatePool, init_pool
from dkdm_cli.distill.sources import PoolSource, label_plan, teacher_function
from dkdm_cli.teachers.native import load_model_file_teacher

NULL = 3  # the tiny conditional teacher: classes 0..2, null class 3


@pytest.fixture(scope="module")
def cond_teacher(tiny_cond_teacher_file):
    return load_model_file_teacher(tiny_cond_teacher_file)


@pytest.fixture(scope="module")
def nonull_teacher_file(tmp_path_factory):
    """Class-conditional without a null class (like ADM's class_cond checkpoints)."""
    return make_tiny_teacher_file(tmp_path_factory.mktemp("t") / "nonull.safetensors",
                                  num_classes=3, class_null=False)


# -- the pool ---------------------------------------------------------------------------------

def test_label_plan_follows_the_class_weights_and_the_null_fraction():
    gen = torch.Generator().manual_seed(0)
    plan = LabelPlan(weights=(1.0, 0.0, 3.0), null_class=NULL, null_prob=0.2)
    y = plan.draw(20_000, gen, torch.device("cpu"))
    counts = torch.bincount(y, minlength=4).double() / len(y)
    assert counts[1] == 0  # a class of weight 0 is never drawn
    assert abs(counts[NULL] - 0.2) < 0.015
    assert abs(counts[2] / counts[0] - 3.0) < 0.25
    no_null = LabelPlan(weights=(1.0, 1.0, 1.0), null_class=None, null_prob=0.5)
    assert int(no_null.draw(1000, gen, torch.device("cpu")).max()) <= 2


def test_labels_stay_with_their_chain_and_are_redrawn_on_restart():
    gen = torch.Generator().manual_seed(1)
    plan = LabelPlan(weights=(1.0, 1.0, 1.0), null_class=NULL, null_prob=0.25)
    n = 400
    pool = StatePool(torch.zeros(n, 1, 2, 2), torch.tensor([0, 5] * (n // 2)), num_timesteps=10,
                     generator=gen, y=plan.draw(n, gen, torch.device("cpu")), labels=plan)
    before = pool.y.clone()
    idx = torch.arange(n)
    t = pool.t.clone()
    pool.write_back(idx, torch.ones(n, 1, 2, 2), t)
    moving = t == 5
    assert torch.equal(pool.y[moving], before[moving])  # still on their chain: same label
    restarted = ~moving
    assert bool((pool.t[restarted] == 9).all())
    assert not torch.equal(pool.y[restarted], before[restarted])  # fresh labels on restart


def test_the_start_up_steps_each_state_with_its_own_label(cond_teacher):
    seen = []

    def teacher_fn(x, t, y):
        seen.append(y.clone())
        return cond_teacher.model_output(x, t, y)

    plan = label_plan(DistillConfig(), cond_teacher)
    pool = init_pool(size=12, shape=(1, 8, 8), diffusion=cond_teacher.diffusion, teacher_fn=teacher_fn,
                     mode="dynamic", init="fast", init_steps=3, chunk=5, clip_denoised=True,
                     device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                     labels=plan)
    assert pool.y.shape == (12,) and seen
    assert set(torch.cat(seen).tolist()) <= set(pool.y.tolist())


def test_null_states_get_the_unconditional_target(cond_teacher):
    d = DistillConfig(cfg_dropout=0.5)
    fn, per_state = teacher_function(d, cond_teacher)
    assert per_state == 1
    gen = torch.Generator().manual_seed(3)
    plan = label_plan(d, cond_teacher)
    pool = init_pool(size=16, shape=(1, 8, 8), diffusion=cond_teacher.diffusion, teacher_fn=fn,
                     mode="shuffle", init="fast", init_steps=2, chunk=16, clip_denoised=True,
                     device=torch.device("cpu"), generator=gen, labels=plan)
    source = PoolSource(pool, teacher_fn=fn, diffusion=cond_teacher.diffusion, batch_size=16,
                        clip_denoised=True, lam=0.001, startup_forwards=0)
    x, t, y = pool.x.clone(), pool.t.clone(), pool.y.clone()
    batch = source.next()
    assert torch.equal(batch.y, y) and torch.equal(batch.x, x)
    null = y == NULL
    assert 0 < int(null.sum()) < 16
    cond = cond_teacher.model_output(x, t, y)
    uncond = cond_teacher.model_output(x, t)  # no labels: the null class
    student_out = torch.zeros_like(cond)
    terms = batch.loss(student_out)
    # mse against the target = the mean square of the teacher's eps, row by row
    expect = (cond[:, :1] ** 2).flatten(1).mean(1)
    assert torch.allclose(terms.mse, expect, atol=1e-6)
    assert torch.allclose(cond[null], uncond[null], atol=1e-6)
    assert not torch.allclose(cond[~null], uncond[~null], atol=1e-4)


# -- guidance ---------------------------------------------------------------------------------

def test_guide_combines_eps_and_keeps_the_conditional_variance():
    c, u = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    out = guide(c, u, scale=3.0, channels=1)
    assert torch.allclose(out[:, :1], u[:, :1] + 3.0 * (c[:, :1] - u[:, :1]))
    assert torch.equal(out[:, 1:], c[:, 1:])
    assert torch.allclose(guide(c, u, scale=1.0, channels=1), c)
    assert torch.allclose(guide(c, u, scale=0.0, channels=1)[:, :1], u[:, :1])


def test_guided_distillation_target_is_the_teachers_guided_prediction(cond_teacher):
    d = DistillConfig(guidance_scale=4.0)
    fn, per_state = teacher_function(d, cond_teacher)
    assert per_state == 2
    x, t = torch.randn(5, 1, 8, 8), torch.tensor([1, 5, 9, 14, 19])
    y = torch.tensor([0, 1, 2, NULL, 1])
    got = fn(x, t, y)
    cond, uncond = cond_teacher.model_output(x, t, y), cond_teacher.model_output(x, t)
    want = torch.cat([uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]), cond[:, 1:]], dim=1)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[3], uncond[3], atol=1e-5)  # a null state: guidance changes nothing


def test_sampling_with_cfg_is_the_guided_combination(cond_teacher):
    y = torch.tensor([2, 0])
    x, mt = torch.randn(2, 1, 8, 8), torch.tensor([3, 11])
    fn = cond_teacher.denoise_fn(y, cfg=2.5)
    manual = guided(cond_teacher.denoise, y=y, null_class=NULL, scale=2.5, channels=1)(x, mt)
    c, u = cond_teacher.denoise(x, mt, y), cond_teacher.denoise(x, mt)
    assert torch.allclose(fn(x, mt), manual)
    assert torch.allclose(fn(x, mt)[:, :1], u[:, :1] + 2.5 * (c[:, :1] - u[:, :1]), atol=1e-5)


def test_teacher_forwards_count_both_branches_with_guidance(tiny_cond_teacher_file, tmp_path, capsys):
    rd = tmp_path / "guided"
    args = tiny_distill_args(tiny_cond_teacher_file, rd, iterations=4,
                             extra=["--set", "distill.guidance_scale=3.0"])
    assert run([a for a in args if a != "--quiet"] + ["--json"]) == 0
    end = json.loads(capsys.readouterr().out.splitlines()[-1])
    startup = json.loads((rd / "startup.json").read_text())
    assert startup["labels"] == {"classes": 3, "null_class": NULL, "guidance_scale": 3.0,
                                 "null_fraction": startup["labels"]["null_fraction"]}
    assert end["teacher_forwards"] == startup["teacher_forwards"] + 4 * 4 * 2


# -- the run: student, checkpoint, resume -----------------------------------------------------

def test_the_student_gets_the_teachers_classes_and_null_row(cond_teacher, nonull_teacher_file):
    cfg = load_config(search_cwd=False, sets=["student.name=\"dit-n/2\""])
    student = build_student(cfg, cond_teacher, torch.device("cpu"))
    assert (student.num_classes, student.null_class) == (3, NULL)
    assert student.y_embedder.num_embeddings == 4
    other = build_student(cfg, load_model_file_teacher(nonull_teacher_file), torch.device("cpu"))
    assert (other.num_classes, other.null_class) == (3, None)


def test_labelled_pool_is_checkpointed_and_resumed_bit_exact(tiny_cond_teacher_file, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(tiny_distill_args(tiny_cond_teacher_file, straight, iterations=5)) == 0
    assert run(tiny_distill_args(tiny_cond_teacher_file, split, iterations=3)) == 0
    assert run(tiny_distill_args(tiny_cond_teacher_file, split, iterations=5)) == 0
    a, b = (read_checkpoint(list_checkpoints(d)[-1]) for d in (straight, split))
    assert "pool/y" in a.tensors and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert int(a.tensors["pool/y"].max()) <= NULL
    assert "student/label_emb.weight" in a.tensors


@pytest.mark.parametrize("sets, needle", [
    (["distill.class_weights=[1, 2]"], "expected 3 numbers"),
    (["distill.class_weights=[1, -2, 1]"], ">= 0"),
    (["distill.mode=\"synthetic\""], "not supported for a class-conditional"),
    (["student.kwargs={num_classes=5}"], "follow the teacher's"),
])
def test_bad_class_settings_exit_2(sets, needle, tiny_cond_teacher_file, tmp_path, capsys):
    args = tiny_distill_args(tiny_cond_teacher_file, tmp_path / "rd")
    for expr in sets:
        args += ["--set", expr]
    assert run(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "rd").exists()


def test_guidance_needs_a_null_class_and_classes_need_a_conditional_teacher(
        nonull_teacher_file, tiny_teacher_file, tmp_path, capsys):
    args = tiny_distill_args(nonull_teacher_file, tmp_path / "a", extra=["--set", "distill.guidance_scale=2"])
    assert run(args) == 2
    assert "no null class" in capsys.readouterr().err
    args = tiny_distill_args(tiny_teacher_file, tmp_path / "b", extra=["--set", "distill.class_weights=[1]"])
    assert run(args) == 2
    assert "unconditional" in capsys.readouterr().err


# -- sampling and evaluation ------------------------------------------------------------------

def test_sample_class_and_cfg_write_labels(tiny_cond_teacher_file, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    assert run(["sample", "--teacher", str(tiny_cond_teacher_file), "--class", "2", "--class", "0",
                "--cfg", "3", "--num", "5", "--steps", "3", "--npz", str(npz), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["class_counts"] == {"0": 2, "2": 3} and out["cfg_scale"] == 3.0
    with np.load(npz) as data:
        assert data["arr_0"].shape == (5, 8, 8, 1)
        assert data["arr_1"].tolist() == [2, 0, 2, 0, 2]


def test_guidance_changes_samples_and_one_is_the_conditional_model(tiny_cond_teacher_file, tmp_path):
    from dkdm_cli.sample import generate

    teacher = load_model_file_teacher(tiny_cond_teacher_file)
    y = torch.tensor([1, 1, 2, 2])
    plain = generate(teacher, num=4, steps=4, labels=y)
    again = generate(teacher, num=4, steps=4, labels=y, cfg=1.0)
    strong = generate(teacher, num=4, steps=4, labels=y, cfg=5.0)
    assert np.array_equal(plain, again)
    assert not np.array_equal(plain, strong)


@pytest.mark.parametrize("argv, needle", [
    (["--teacher", "{cond}", "--class", "3"], "has classes 0..2"),
    (["--teacher", "{plain}", "--class", "1"], "is unconditional"),
    (["--teacher", "{plain}", "--cfg", "2"], "unconditional"),
    (["--teacher", "{nonull}", "--cfg", "2", "--class", "1"], "no null class"),
])
def test_sample_refuses_bad_classes(argv, needle, tiny_cond_teacher_file, tiny_teacher_file,
                                    nonull_teacher_file, tmp_path, capsys):
    paths = {"cond": tiny_cond_teacher_file, "plain": tiny_teacher_file, "nonull": nonull_teacher_file}
    argv = [a.format(**paths) for a in argv]
    grid = tmp_path / "g.png"
    assert run(["sample", *argv, "--num", "2", "--steps", "2", "--grid", str(grid)]) == 2
    assert needle in capsys.readouterr().err
    assert not grid.exists()
    # No --class and no null class: the classes are drawn uniformly, so that one works.
    assert run(["sample", "--teacher", str(nonull_teacher_file), "--num", "2", "--steps", "2",
                "--grid", str(grid), "-q"]) == 0


def test_eval_consistency_scores_digit_shaped_conditional_models(tmp_path, capsys):
    teacher = make_tiny_teacher_file(tmp_path / "dc.safetensors", image_size=16, num_classes=10,
                                     class_null=True)
    assert run(["eval", str(teacher), "--consistency", "--num", "20", "--steps", "2", "--json",
                "--class", "1", "--class", "7"]) == 0
    out = json.loads(capsys.readouterr().out)
    value = out["metrics"]["consistency"]
    assert 0.0 <= value <= 1.0
    assert set(out["samples"]["consistency_per_class"]) == {"1", "7"}
    assert out["samples"]["classes"] == [1, 7] and out["samples"]["num_classes"] == 10
    per = out["samples"]["consistency_per_class"]
    assert abs((per["1"] + per["7"]) / 2 - value) < 1e-6  # 10 of each


def test_class_consistency_counts_the_classifiers_agreement():
    from dkdm_cli.quality.digits import class_consistency, load_real_digit_labels, load_real_digits

    x, y = load_real_digits()[:300], load_real_digit_labels()[:300]
    right = class_consistency(x, y)
    wrong = class_consistency(x, (y + 1) % 10)
    assert right["consistency"] > 0.9 > 0.1 > wrong["consistency"]
    assert set(right["per_class"]) == set(range(10))


def test_eval_consistency_refuses_models_it_cannot_score(tiny_cond_teacher_file, tiny_teacher_file, capsys):
    assert run(["eval", str(tiny_cond_teacher_file), "--consistency", "--num", "4", "--steps", "2"]) == 2
    assert "ten classes" in capsys.readouterr().err
    assert run(["eval", str(tiny_teacher_file), "--consistency", "--num", "4", "--steps", "2"]) == 2
    assert "class-conditional 16x16x1 models" in capsys.readouterr().err


def test_a_conditional_student_exports_to_safetensors_and_refuses_onnx(tiny_cond_teacher_file, tmp_path,
                                                                      capsys):
    rd = tmp_path / "run"
    assert run(tiny_distill_args(tiny_cond_teacher_file, rd, iterations=2)) == 0
    out = tmp_path / "student.safetensors"
    assert run(["export", "--run-dir", str(rd), "--out", str(out), "-q"]) == 0
    student = load_model_file_teacher(out)
    assert (student.num_classes, student.null_class) == (3, NULL)
    assert run(["export", "--run-dir", str(rd), "--out", str(tmp_path / "s.onnx")]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()


def test_a_guided_student_is_set_beside_its_teacher_at_that_scale(tiny_cond_teacher_file, tmp_path):
    from dkdm_cli.sample import distilled_guidance, teacher_scale
    from dkdm_cli.teachers.native import load_run_teacher

    rd = tmp_path / "guided"
    assert run(tiny_distill_args(tiny_cond_teacher_file, rd, iterations=2,
                                 extra=["--set", "distill.guidance_scale=3.0"])) == 0
    student = load_run_teacher(rd)
    assert distilled_guidance(student) == 3.0
    assert teacher_scale(student, 1.0) == 3.0 and teacher_scale(student, 2.0) == 2.0
    out = tmp_path / "g.safetensors"
    assert run(["export", "--run-dir", str(rd), "--out", str(out), "-q"]) == 0
    assert distilled_guidance(load_model_file_teacher(out)) == 3.0
    assert distilled_guidance(load_model_file_teacher(tiny_cond_teacher_file)) == 1.0
