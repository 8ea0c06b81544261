"""Your own model as a teacher: `dkdm_cli.api.denoiser` and `py:FILE.py:FUNCTION` /
`py:package.module:FUNCTION` specs; every bad argument and factory result refused in one line;
the worked example of docs/bring-your-own-teacher.md through every command; api.distill."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from dkdm_cli.api import denoiser, distill, load_student, load_teacher
from dkdm_cli.checkpoint import load_latest
from dkdm_cli.cli import run
from dkdm_cli.errors import ConfigError, TeacherError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "my_ddpm.py"
TINY_STUDENT = ["--student", "unet-t", "--set", "student.kwargs={model_channels=8, "
                "channel_mult=[1, 2], attention_resolutions=[2], num_heads=1}"]
QUICK = ["--iterations", "2", "--batch-size", "2", "--quiet", "--set", "distill.rho=0.1",
         "--set", "distill.init_steps=2", "--set", "distill.grid_every=0",
         "--set", "distill.save_every=2"]

# A module of factories, good and bad, written to a temp folder by the `factories` fixture.
FACTORIES = '''
import torch
from torch import nn

from dkdm_cli.api import denoiser


class Net(nn.Module):
    def __init__(self, out_channels=1, classes=0, fill=None):
        super().__init__()
        self.conv = nn.Conv2d(1, out_channels, 3, padding=1)
        self.emb = nn.Embedding(classes + 1, out_channels) if classes else None
        if fill is not None:
            nn.init.constant_(self.conv.weight, fill)

    def forward(self, x, t, y=None):
        h = self.conv(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 20)
        return h if self.emb is None else h + self.emb(y)[:, :, None, None]


class Tuple(Net):
    def forward(self, x, t):
        return (self.conv(x),)


class Ints(Net):
    def forward(self, x, t):
        return self.conv(x).long()


def good():
    return denoiser(Net(), sample_shape=(1, 8, 8), num_timesteps=20, schedule="cosine")


def cond():
    return denoiser(Net(classes=2), sample_shape=(1, 8, 8), num_timesteps=20, num_classes=2,
                    null_class=2)


def latent():
    return denoiser(Net(), sample_shape=(1, 8, 8), num_timesteps=20, clip_denoised=False,
                    decode=lambda z: z.repeat(1, 3, 1, 1).tanh())


def raises():
    raise RuntimeError("no weights here")


def not_a_teacher():
    return Net()


def wrong_shape():
    return denoiser(Net(out_channels=3), sample_shape=(1, 8, 8), num_timesteps=20)


def needs_2c():
    return denoiser(Net(), sample_shape=(1, 8, 8), num_timesteps=20, variance="learned_range")


def nan():
    return denoiser(Net(fill=float("nan")), sample_shape=(1, 8, 8), num_timesteps=20)


def a_tuple():
    return denoiser(Tuple(), sample_shape=(1, 8, 8), num_timesteps=20)


def ints():
    return denoiser(Ints(), sample_shape=(1, 8, 8), num_timesteps=20)


def labels_not_taken():
    return denoiser(Tuple(), sample_shape=(1, 8, 8), num_timesteps=20, num_classes=3)


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def factories(tmp_path) -> Path:
    """teachers.py (the factories above) in a temp folder, with a helper module it imports."""
    (tmp_path / "teachers.py").write_text(FACTORIES)
    return tmp_path / "teachers.py"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _sample(spec: str, tmp_path: Path, *extra: str) -> int:
    return run(["sample", "--teacher", spec, "--num", "2", "--steps", "2", "--npz",
                str(tmp_path / "s.npz"), "--quiet", *extra])


# -- py: specs ----------------------------------------------------------------------------------

def test_a_file_and_a_module_give_the_same_teacher(factories, monkeypatch):
    from_file = load_teacher(f"py:{factories}:good")
    assert from_file.source == f"py:{factories.resolve()}:good"
    assert from_file.name == "teachers:good" and from_file.sample_shape == (1, 8, 8)
    monkeypatch.syspath_prepend(str(factories.parent))
    from_module = load_teacher("py:teachers:good")
    assert from_module.source == "py:teachers:good"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 17])
    torch.manual_seed(0)
    a = load_teacher(f"py:{factories}:good").model_output(x, t)
    torch.manual_seed(0)
    torch.testing.assert_close(load_teacher("py:teachers:good").model_output(x, t), a)


@pytest.mark.parametrize("name,needle", [
    ("raises", "raises() raised RuntimeError: no weights here"),
    ("not_a_teacher", "not_a_teacher() returned Net; it must return dkdm_cli.api.denoiser"),
    ("wrong_shape", "returned shape (2, 3, 8, 8)"),
    ("needs_2c", "variance learned_range needs (2, 2, 8, 8)"),
    ("nan", "NaN or inf"),
    ("a_tuple", "returned tuple, expected a tensor"),
    ("ints", "returned torch.int64, expected a floating tensor"),
    ("labels_not_taken", "model(x, t, y) failed on a probe batch"),
    ("missing", "has no function 'missing'"),
    ("NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
])
def test_each_bad_factory_result_is_one_line_exit_2(name, needle, factories, tmp_path, capsys):
    assert _sample(f"py:{factories}:{name}", tmp_path) == 2
    err = _one_line_error(capsys)
    assert needle in err and f"py:{factories}:{name}" in err


@pytest.mark.parametrize("spec,needle", [
    ("py:nowhere.py:teacher", "no such file"),
    ("py:no_such_module_xyz:teacher", "no module named 'no_such_module_xyz'"),
    ("py:a/b:teacher", "neither a .py file nor a module name"),
    ("py:teachers.py", "expected py:FILE.py:FUNCTION"),
    ("py:SYNTAX:teacher", "importing"),
])
def test_bad_specs_are_one_line_exit_2(spec, needle, factories, tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def teacher(:\n")
    spec = spec.replace("SYNTAX", str(tmp_path / "broken.py"))
    assert _sample(spec, tmp_path) == 2
    assert needle in _one_line_error(capsys)


def test_sibling_modules_of_the_file_import(tmp_path):
    (tmp_path / "mynet.py").write_text(textwrap.dedent('''
        from torch import nn

        class Net(nn.Conv2d):
            def __init__(self):
                super().__init__(1, 1, 1)

            def forward(self, x, t):
                return super().forward(x)
    '''))
    (tmp_path / "entry.py").write_text(textwrap.dedent('''
        from mynet import Net
        from dkdm_cli.api import denoiser

        def teacher():
            return denoiser(Net(), sample_shape=(1, 4, 4), num_timesteps=10)
    '''))
    assert load_teacher(f"py:{tmp_path / 'entry.py'}:teacher").settings.num_timesteps == 10


# -- api.denoiser -------------------------------------------------------------------------------

class TNet(nn.Conv2d):
    """A conv that takes (x, t), as a diffusion model's forward does."""

    def __init__(self, out_channels: int = 1) -> None:
        super().__init__(1, out_channels, 3, padding=1)

    def forward(self, x, t):
        return super().forward(x)


def _net() -> nn.Module:
    return TNet()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model=lambda x, t: x), "model must be a torch.nn.Module"),
    (dict(model=nn.Identity()), "has no parameters"),
    (dict(sample_shape=(8, 8)), "sample_shape must be (C, H, W)"),
    (dict(schedule="sigmoid"), "schedule 'sigmoid'"),
    (dict(schedule="cosine", betas=[0.1, 0.2], num_timesteps=None), "not both"),
    (dict(betas=[0.1, 1.5], num_timesteps=None), "strictly between 0 and 1"),
    (dict(betas=["a", 0.2], num_timesteps=None), "betas must be a list of numbers"),
    (dict(betas=[0.1, 0.2], num_timesteps=5), "2 betas for num_timesteps = 5"),
    (dict(num_timesteps=0), "num_timesteps must be a positive integer"),
    (dict(prediction="noise"), "prediction 'noise'"),
    (dict(variance="learned"), "variance 'learned'"),
    (dict(clip_denoised="yes"), "clip_denoised must be True or False"),
    (dict(timesteps=1000), "timesteps must be a function"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(num_classes=3, null_class=0), "null_class must be num_classes (3)"),
    (dict(null_class=1), "null_class needs num_classes > 0"),
])
def test_each_bad_argument_is_refused_in_one_line(kwargs, needle):
    args = {"model": _net(), "sample_shape": (1, 4, 4), "num_timesteps": 10, **kwargs}
    with pytest.raises(TeacherError) as err:
        denoiser(args.pop("model"), **args)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_the_model_reads_steps_through_timesteps():
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            seen.append(t.clone())
            return x * self.w

    teacher = denoiser(Recorder(), sample_shape=(1, 4, 4), num_timesteps=10,
                       timesteps=lambda t: (t + 1) / 10)
    torch.testing.assert_close(seen[0], torch.tensor([0.1, 1.0]))  # the probe: steps 0 and T-1
    teacher.model_output(torch.zeros(1, 1, 4, 4), torch.tensor([4]))
    torch.testing.assert_close(seen[-1], torch.tensor([0.5]))


def test_settings_map_to_dkdms_process():
    t = denoiser(_net(), sample_shape=(1, 4, 4), betas=[0.1, 0.2, 0.3], prediction="x0",
                 variance="fixed_large", clip_denoised=False)
    assert (t.settings.schedule, t.settings.num_timesteps, t.settings.prediction) == \
        ("explicit", 3, "sample")
    assert t.settings.variance == "fixed_large" and not t.settings.clip_denoised
    assert denoiser(_net(), sample_shape=(1, 4, 4)).settings.num_timesteps == 1000
    v = denoiser(_net(), sample_shape=(1, 4, 4), num_timesteps=10, schedule="cosine",
                 prediction="v")
    assert (v.settings.schedule, v.settings.prediction) == ("cosine", "v_prediction")


# -- every command, with the documented example ------------------------------------------------

def test_the_doc_shows_the_example_verbatim():
    doc = (ROOT / "docs" / "bring-your-own-teacher.md").read_text()
    assert EXAMPLE.read_text() in doc


@pytest.mark.slow
def test_the_example_through_every_command(tmp_path, capsys, inception_weights, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = f"py:{EXAMPLE}:teacher"
    assert _sample(spec, tmp_path, "--grid", "teacher.png") == 0
    assert run(["distill", "--teacher", spec, *TINY_STUDENT, *QUICK]) == 0
    run_dir = tmp_path / "runs" / "my_ddpm-teacher-unet-t"  # named after the file and function
    assert load_latest(run_dir).doc["teacher"] == f"py:{EXAMPLE}:teacher"
    assert run(["sample", "--model", str(run_dir), "--num", "2", "--steps", "2", "--grid",
                "s.png", "--compare-teacher", "vs.png", "--quiet"]) == 0
    assert run(["eval", str(run_dir), "--fid", "--num", "4", "--steps", "2", "--inception-weights",
                str(inception_weights), "--allow-unknown-inception", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["reference"]["teacher"] == spec and record["metrics"]["fid"] >= 0
    for fmt, out in (("safetensors", "s.safetensors"), ("diffusers", "folder")):
        assert run(["export", "--run-dir", str(run_dir), "--format", fmt, "--out", out,
                    "--quiet"]) == 0
    assert load_student("folder").sample_shape == (1, 28, 28)
    # chaining: the student teaches, and its own student records it
    assert run(["distill", "--teacher", str(run_dir), *TINY_STUDENT, *QUICK, "--run-dir",
                "chain"]) == 0
    assert load_latest(tmp_path / "chain").doc["teacher"] == str(run_dir.resolve())


@pytest.mark.slow
def test_conditional_and_latent_py_teachers(factories, tmp_path, capsys):
    spec = f"py:{factories}:cond"
    assert _sample(spec, tmp_path, "--class", "1", "--cfg", "2.0") == 0
    assert load_teacher(spec).null_class == 2
    latent = f"py:{factories}:latent"
    assert _sample(latent, tmp_path, "--grid", str(tmp_path / "g.png")) == 0
    run_dir = tmp_path / "lat"
    assert run(["distill", "--teacher", latent, *TINY_STUDENT, *QUICK, "--run-dir", str(run_dir)]) == 0
    assert load_student(run_dir).decode(torch.zeros(1, 1, 8, 8)).shape == (1, 3, 8, 8)
    assert run(["export", "--run-dir", str(run_dir), "--format", "diffusers", "--out",
                str(tmp_path / "f")]) == 2
    assert "its own Python code" in _one_line_error(capsys)
    assert not (tmp_path / "f").exists()


# -- api.distill ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_api_distill_trains_an_in_memory_teacher(tmp_path, capsys):
    torch.manual_seed(0)
    teacher = denoiser(TNet(out_channels=2), sample_shape=(1, 8, 8), num_timesteps=20,
                       variance="learned_range")
    kwargs = dict(student="unet-t", run_dir=tmp_path / "run", batch_size=2, rho=0.1,
                  init_steps=2, grid_every=0, save_every=2,
                  student_kwargs={"model_channels": 8, "channel_mult": [1, 2],
                                  "attention_resolutions": [2], "num_heads": 1})
    run_dir = distill(teacher, iterations=2, **kwargs)
    assert run_dir == tmp_path / "run" and load_latest(run_dir).step == 2
    assert load_latest(run_dir).doc["teacher"] == "python:TNet"
    assert load_student(run_dir).learn_sigma
    assert distill(teacher, iterations=4, **kwargs) == run_dir  # resumes
    assert load_latest(run_dir).step == 4
    assert run(["sample", "--model", str(run_dir), "--num", "1", "--steps", "1", "--grid",
                str(tmp_path / "g.png"), "--compare-teacher", str(tmp_path / "vs.png")]) == 2
    assert "cannot be loaded again" in _one_line_error(capsys)
    with pytest.raises(ConfigError, match="did you mean 'iterations'"):
        distill(teacher, iteratons=2, **kwargs)
