"""Few-step students (issue 21): consistency distillation on the pool, its sampler, the warm
start, and the runs and exports that carry the sampler."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_distill_args

from dkdm_cli.checkpoint import list_checkpoints, read_checkpoint
from dkdm_cli.cli import run
from dkdm_cli.config import load_config
from dkdm_cli.diffusion import consistency as cm
from dkdm_cli.distill.consistency import ConsistencyObjective
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.distill.pool import teacher_step
from dkdm_cli.errors import ConfigError
from dkdm_cli.teachers.spec import resolve_teacher

FAST = ["--objective", "consistency"]


@pytest.fixture(scope="module")
def dkdm_run(tmp_path_factory, tiny_teacher_file):
    """A DKDM student (the first stage) of the tiny teacher."""
    rd = tmp_path_factory.mktemp("stage1") / "run"
    assert run(tiny_distill_args(tiny_teacher_file, rd, iterations=3)) == 0
    return rd


def _objective(teacher, student, k=3):
    return ConsistencyObjective(teacher.diffusion, student, k=k, target_rate=0.95, clip=True,
                                autocast=lambda: torch.autocast("cpu", enabled=False))


def test_the_target_is_the_boundary_below_step_k_and_the_ema_net_above(tiny_teacher_file):
    teacher = resolve_teacher(str(tiny_teacher_file))
    d = teacher.diffusion
    student = torch.nn.Module()
    calls = []

    class Net(torch.nn.Module):  # the target network: records where it is evaluated
        def forward(self, x, t):
            calls.append(t.clone())
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    student = Net()
    obj = _objective(teacher, student, k=3)
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 2, 3, 19])
    res = teacher_step(teacher.model_output, d, x=x, t=t, noise=torch.randn_like(x), clip_denoised=True)
    terms = obj(res, x, t, None)
    target_t = calls[0]
    assert target_t.tolist() == [0, 0, 0, 16]  # t - k, clamped for the network call
    # Rows with t < k take the teacher's own clipped x_0: f(x, CLEAN) = x is the boundary.
    out = torch.zeros(4, 2, 8, 8)
    f_s = cm.consistency_value(d, out, x_t=x, coefs=res.step.coefs, clip=True)
    per = terms(out).mse
    want_boundary = ((f_s - res.step.pred_x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(per[:2], want_boundary[:2])
    # Above: the target network's f at the neighbour (its eps is 0 here, so f = x_{t-k}/a).
    ck = d.coefs(torch.tensor([0, 16]), x[2:])
    xk = cm.renoise(res.step.pred_x0[2:], res.step.eps[2:], ck)
    f_k = (xk * ck.sqrt_recip_alphas_cumprod).clamp(-1, 1)
    assert torch.allclose(per[2:], ((f_s[2:] - f_k) ** 2).flatten(1).mean(1), atol=1e-6)


def test_the_neighbour_is_the_teachers_ddim_step(tiny_teacher_file):
    """x_{t-k} from the pool's own teacher forward equals a DDIM (eta 0) step of the teacher."""
    teacher = resolve_teacher(str(tiny_teacher_file))
    d = teacher.diffusion
    x, t, k = torch.randn(3, 1, 8, 8), torch.tensor([5, 9, 19]), 4
    res = teacher_step(teacher.model_output, d, x=x, t=t, noise=torch.randn_like(x), clip_denoised=True)
    got = cm.renoise(res.step.pred_x0, res.step.eps, d.coefs(t - k, x))
    for i in range(3):
        sub = d.respaced([int(t[i]) - k, int(t[i])])  # two steps: t-k and t
        one = torch.tensor([1])
        step = sub.p_mean_variance(teacher.model_output(x[i:i + 1], t[i:i + 1]), x_t=x[i:i + 1],
                                   t=one, clip_denoised=True)
        want = sub.ddim_step(step, x_t=x[i:i + 1], t=one, noise=torch.zeros_like(x[i:i + 1]), eta=0.0)
        torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_no_extra_teacher_forward(tiny_teacher_file, tmp_path):
    """The consistency objective uses the one teacher forward the pool makes: b per iteration."""
    cfg = load_config(None, search_cwd=False, sets=[
        f'teacher.name="{tiny_teacher_file}"', 'student.name="unet-t"',
        "student.kwargs={model_channels=8, channel_mult=[1, 2], num_res_blocks=1}",
        "distill.batch_size=4", "distill.rho=0.5", "distill.init_steps=2",
        'distill.objective="consistency"'])
    teacher = resolve_teacher(str(tiny_teacher_file))
    obs = Observer(tmp_path, is_main=True, quiet=True, json_out=False, tensorboard=False)
    run_ = Distiller(cfg, info=DistInfo(), run_dir=tmp_path, teacher=teacher, observer=obs)
    run_.prepare_source(None)
    seen = []
    inner = run_.source.teacher_fn
    run_.source.teacher_fn = lambda x, t, *y: (seen.append(len(x)), inner(x, t, *y))[1]
    window = MetricWindow(run_.device, 20)
    for _ in range(3):
        run_.iteration(window)
    assert seen == [4, 4, 4] and run_.source.forwards_per_iteration == 4


def test_consistency_runs_resume_bit_exactly_with_their_target(tiny_teacher_file, dkdm_run, tmp_path):
    init = ["--student-init", str(dkdm_run)]
    straight, split = tmp_path / "a", tmp_path / "b"
    assert run(tiny_distill_args(tiny_teacher_file, straight, iterations=6, extra=FAST + init)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=3, extra=FAST + init)) == 0
    assert run(tiny_distill_args(tiny_teacher_file, split, iterations=6, extra=FAST + init)) == 0
    a = read_checkpoint(list_checkpoints(straight)[-1])
    b = read_checkpoint(list_checkpoints(split)[-1])
    assert any(k.startswith("target/") for k in a.tensors)
    assert set(a.tensors) == set(b.tensors)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert a.doc["sampler"] == {"name": "consistency", "top": cm.default_top(20)}


def test_the_warm_start_loads_the_first_stage_student(tiny_teacher_file, dkdm_run, tmp_path):
    cfg = load_config(None, search_cwd=False, sets=[
        f'teacher.name="{tiny_teacher_file}"', 'student.name="unet-t"',
        "student.kwargs={model_channels=8, channel_mult=[1, 2], attention_resolutions=[2], "
        "num_heads=1}", f'student.init="{dkdm_run}"', "distill.batch_size=4", "distill.rho=0.1"])
    teacher = resolve_teacher(str(tiny_teacher_file))
    obs = Observer(tmp_path, is_main=True, quiet=True, json_out=False, tensorboard=False)
    run_ = Distiller(cfg, info=DistInfo(), run_dir=tmp_path, teacher=teacher, observer=obs)
    ema = read_checkpoint(list_checkpoints(dkdm_run)[-1]).group("ema")
    for name, value in run_.state.student.state_dict().items():
        assert torch.equal(value, ema[name]), name
    for name, value in run_.state.ema.shadow.state_dict().items():
        assert torch.equal(value, ema[name]), name


@pytest.mark.parametrize("bad,message", [
    (["--student", "dit-n/2"], "a unet-t student, but this run trains dit-n/2"),
    (["--set", "student.kwargs={model_channels=16}"], "built with other arguments"),
    (["--set", "distill.mode=synthetic"], "mode synthetic has none"),
    (["--set", 'distill.pool_from="RUN"', "--set", "distill.rho=0.2"], "its pool has"),
    (["--set", 'distill.pool_from="NOWHERE"'], "not a dkdm run directory with a checkpoint"),
])
def test_bad_few_step_settings_are_refused_before_the_run_directory(bad, message, tiny_teacher_file,
                                                                    dkdm_run, tmp_path, capsys):
    rd = tmp_path / "run"
    bad = [a.replace("RUN", str(dkdm_run)).replace("NOWHERE", str(tmp_path / "nowhere"))
           for a in bad]
    args = tiny_distill_args(tiny_teacher_file, rd, iterations=2,
                             extra=FAST + ["--student-init", str(dkdm_run)])
    if bad[0] == "--student":  # another preset, with its own default arguments
        args[args.index("--student") + 1] = bad[1]
        k = next(i for i, a in enumerate(args) if a.startswith("student.kwargs"))
        del args[k - 1:k + 1]
    else:
        args += bad
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not rd.exists()


def test_an_init_from_another_teachers_shape_is_refused(tmp_path, dkdm_run, capsys):
    from dkdm_cli import testing

    other = testing.write_teacher_file(tmp_path / "rgb.safetensors", channels=3)
    rd = tmp_path / "run"
    assert run(tiny_distill_args(other, rd, iterations=2,
                                 extra=FAST + ["--student-init", str(dkdm_run)])) == 2
    err = capsys.readouterr().err
    assert "student.init" in err and "in_channels 1 vs 3" in err and not rd.exists()


def test_a_pool_of_another_teacher_is_refused(tmp_path, dkdm_run, capsys):
    from dkdm_cli import testing

    other = testing.write_teacher_file(tmp_path / "other.safetensors")
    rd = tmp_path / "run"
    assert run(tiny_distill_args(other, rd, iterations=2, extra=FAST + [
        "--set", f'distill.pool_from="{dkdm_run}"'])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill.pool_from" in err[0] and "its pool is of teacher" in err[0]
    assert not rd.exists()


def test_the_few_step_stage_starts_from_the_first_stages_pool(dkdm_run, tmp_path, monkeypatch):
    """`--few-step RUN` reuses RUN's saved pool (no start-up, no teacher forward spent on it):
    after one iteration only the b states it stepped differ from RUN's pool."""
    monkeypatch.chdir(tmp_path)
    fast = tmp_path / "fast"
    assert run(["distill", "--few-step", str(dkdm_run), "--iterations", "1", "--batch-size", "4",
                "--run-dir", str(fast), "--quiet", "--set", "distill.rho=0.1",
                "--set", "distill.grid_every=0"]) == 0
    startup = json.loads((fast / "startup.json").read_text())
    assert startup["init"] == "saved" and startup["teacher_forwards"] == 0
    base = read_checkpoint(list_checkpoints(dkdm_run)[-1]).tensors["pool/x"]
    mine = read_checkpoint(list_checkpoints(fast)[-1])
    changed = (mine.tensors["pool/x"] != base).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= 4
    last = json.loads((fast / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["teacher_forwards"] == 4  # one iteration of b = 4, nothing for a start-up


def test_steps_beyond_the_ladder_are_refused():
    with pytest.raises(ConfigError, match="1 to 20 steps from step 19"):
        cm.ladder(21, top=19)
    assert cm.ladder(4, top=19) == [19, 14, 10, 5]
    assert cm.ladder(1, top=989) == [989]


def test_few_step_flag_and_automatic_sampler(dkdm_run, tmp_path, capsys, monkeypatch):
    """`dkdm distill --few-step RUN` takes RUN's teacher and student; `dkdm sample --model` and
    `dkdm eval` then use consistency sampling without being told."""
    monkeypatch.chdir(tmp_path)
    args = ["distill", "--few-step", str(dkdm_run), "--iterations", "2", "--batch-size", "4",
            "--set", "distill.rho=0.1", "--set", "distill.init_steps=3",
            "--set", "distill.grid_every=0"]
    assert run(args) == 0
    fast = dkdm_run.with_name(dkdm_run.name + "-fast")
    out = capsys.readouterr().out
    assert "--steps 4" in out and str(fast) in out
    # the summary keeps the loss's significant digits (a consistency loss is ~1e-5)
    last = json.loads((fast / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    printed = float(re.search(r"loss ([0-9.e+-]+)", out).group(1))
    assert printed == pytest.approx(last, rel=1e-3)
    assert run(["sample", "--model", str(fast), "--num", "3", "--npz", "x.npz", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["sampler"], record["steps"], record["top"]) == ("consistency", 4, cm.default_top(20))
    assert run(["sample", "--model", str(fast), "--num", "3", "--steps", "2", "--npz", "y.npz",
                "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert run(["sample", "--model", str(dkdm_run), "--num", "3", "--npz", "z.npz", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "iddpm"  # a DKDM student: as before


def test_exports_carry_the_sampler(dkdm_run, tiny_teacher_file, tmp_path):
    from dkdm_cli.api import load_student

    fast = tmp_path / "fast"
    assert run(tiny_distill_args(tiny_teacher_file, fast, iterations=2,
                                 extra=FAST + ["--student-init", str(dkdm_run)])) == 0
    out = tmp_path / "fast.safetensors"
    assert run(["export", "--run-dir", str(fast), "--out", str(out), "--quiet"]) == 0
    assert load_student(out).sampler["name"] == "consistency"
    onnx = pytest.importorskip("onnx")
    out2 = tmp_path / "fast.onnx"
    assert run(["export", "--run-dir", str(fast), "--out", str(out2), "--quiet"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out2)).metadata_props}
    assert json.loads(meta["dkdm"])["sampler"]["name"] == "consistency"


def test_consistency_sampling_is_seeded_and_uses_the_ladder(dkdm_run):
    from dkdm_cli.api import load_student

    student = load_student(dkdm_run)
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        return student.denoise(x, t)

    noise = torch.randn(2, 1, 8, 8)
    a = cm.consistency_sample(model, student.diffusion, noise=noise, steps=3, top=18,
                              generator=torch.Generator().manual_seed(1))
    b = cm.consistency_sample(model, student.diffusion, noise=noise, steps=3, top=18,
                              generator=torch.Generator().manual_seed(1))
    assert seen == [18, 12, 6] * 2 and torch.equal(a, b) and a.abs().max() <= 1.0
    assert not np.allclose(a.numpy(), 0)


def test_a_conditional_teacher_with_fixed_guidance(tiny_cond_teacher_file, tmp_path, capsys):
    """digits-cond's recipe on a tiny conditional teacher: a DKDM student, then a few-step one
    on the teacher's guided targets (guidance fixed at distillation); it samples a class."""
    first, fast = tmp_path / "cond", tmp_path / "cond-fast"
    assert run(tiny_distill_args(tiny_cond_teacher_file, first, iterations=2)) == 0
    assert run(tiny_distill_args(tiny_cond_teacher_file, fast, iterations=2, extra=FAST + [
        "--student-init", str(first), "--set", "distill.guidance_scale=2.0"])) == 0
    ckpt = read_checkpoint(list_checkpoints(fast)[-1])
    assert ckpt.doc["sampler"]["name"] == "consistency" and "pool/y" in ckpt.tensors
    assert run(["sample", "--model", str(fast), "--class", "1", "--num", "2", "--npz",
                str(tmp_path / "c.npz"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sampler"] == "consistency" and record["classes"] == [1]


@pytest.mark.slow
def test_a_latent_teacher_into_a_dit_from_random_weights(tiny_latent_teacher_dir, tmp_path):
    """Latent teachers (no x_0 clipping) and DiT students work the same way, here from random
    weights (no first stage): any architecture."""
    fast = tmp_path / "latent-fast"
    args = ["distill", "--teacher", str(tiny_latent_teacher_dir), "--student", "dit-n/2",
            "--iterations", "2", "--batch-size", "4", "--run-dir", str(fast), "--quiet",
            "--objective", "consistency", "--set", "distill.rho=0.02", "--set", "distill.init_steps=2",
            "--set", "distill.grid_every=0", "--set", "distill.consistency_k=5"]
    assert run(args) == 0
    from dkdm_cli.api import load_student

    student = load_student(fast)
    assert student.sampler["name"] == "consistency" and not student.settings.clip_denoised
    npz = tmp_path / "l.npz"
    assert run(["sample", "--model", str(fast), "--num", "2", "--npz", str(npz), "--quiet"]) == 0
    assert np.load(npz)["arr_0"].shape == (2, 16, 16, 3)  # decoded by the teacher's VQ model


def test_eval_samples_a_few_step_student_with_its_sampler_and_the_teacher_as_teachers_are(
        tmp_path, tiny_teacher_file, inception_weights):
    """`dkdm eval runs/fast` uses the student's consistency sampling (4 steps by default) and
    samples the teacher reference with IDDPM (50 steps, or all T when fewer)."""
    from conftest import make_run_dir

    from dkdm_cli.config import EvalConfig
    from dkdm_cli.evaluate import evaluate
    from dkdm_cli.evaluate.metrics import MetricSettings

    fast = make_run_dir(tmp_path / "fast", tiny_teacher_file, seed=5,
                        sampler={"name": "consistency", "top": 18})
    cfg = EvalConfig(reference="teacher", inception_weights=str(inception_weights), device="cpu",
                     batch_size=8, num=8, allow_unknown_inception=True)
    result = evaluate(str(fast), cfg=cfg, metrics={"fid"},
                      settings=MetricSettings(fid_layer="64", isc_splits=2, kid_subsets=10))
    assert (result.samples["sampler"], result.samples["steps"]) == ("consistency", 4)
    assert (result.reference["sampler"], result.reference["steps"]) == ("iddpm", 20)


def test_recommended_few_step_settings_are_for_a_warm_start(tmp_path):
    """The digits few-step settings (low lr, no warm-up) apply to a consistency run that starts
    from a trained student; from random weights it gets the from-scratch ones (measured better,
    docs/fewstep.md)."""
    from dkdm_cli.recommended import RECOMMENDED, RECOMMENDED_FEW_STEP

    def resolved(**student):
        return load_config(None, search_cwd=False, flags={
            "teacher": {"name": "digits"}, "student": student,
            "distill": {"objective": "consistency"}}).distill

    scratch, warm = resolved(), resolved(init=str(tmp_path / "run"))
    assert scratch.lr == RECOMMENDED["digits"]["distill"]["lr"] and scratch.warmup == 100
    few = RECOMMENDED_FEW_STEP["digits"]["distill"]
    assert (warm.lr, warm.warmup, warm.iterations) == (few["lr"], 0, few["iterations"])
    assert warm.lr < scratch.lr
