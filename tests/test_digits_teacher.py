"""The built-in `digits` teacher makes recognisable digits, by a measure that can tell.

The measure (dkdm_cli.quality.digits) is checked first: real held-out digits pass it, noise and
blank images fail it. Then the shipped weights are sampled (64 images, 50 iddpm steps) and must
pass the same bounds; and `dkdm sample` / `dkdm teachers` work with the shipped teacher.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from dkdm_cli.cli import run
from dkdm_cli.errors import ShapeMismatchError, UserError
from dkdm_cli.quality import digits as quality
from dkdm_cli.sample import generate, to_uint8
from dkdm_cli.teachers.builtin import builtin_weights

pytest.importorskip("sklearn", reason="the digits measure needs scikit-learn (the test extra)")

SHIPPED = builtin_weights("digits")
needs_shipped = pytest.mark.skipif(
    not SHIPPED.is_file(),
    reason=f"{SHIPPED} is absent: train it with scripts/train_digits_teacher.py (it ships in git)",
)

NUM = 64  # samples the teacher test draws
# Bounds for NUM images, set from these measurements (64 images each, seeds 0-4 or 10 draws):
#                          confident    balance      frechet
#   shipped teacher        0.86-0.95    0.946-0.976  9.7-15.2   (seed 0: 0.875, 0.974, 11.3)
#   held-out real digits   0.80-0.95    0.932-0.990  -
#   training-split digits  0.86-0.98    0.958-0.988  8.0-14.3   (median of seeds 0-4: 9.7)
#   teacher at 200 iters   0.36         0.93         40
#   Gaussian noise (256)   0.0          0.92         566
# confident >= 0.7 is below every real draw and twice the half-trained model; balance >= 0.9 fails
# a model that drops three or more digits (log 7 / log 10 = 0.85); frechet <= 2x the real median
# (19.3) sits above every real and teacher draw and below the half-trained model.
MIN_CONFIDENT = 0.7
MIN_BALANCE = 0.9
MAX_FRECHET_RATIO = 2.0  # times the Frechet distance of NUM real digits


@pytest.fixture(scope="module")
def real_frechet() -> float:
    """Frechet distance of NUM real digits (disjoint from the reference), median of 5 draws."""
    return statistics.median(quality.reference_figures(NUM, seed=s)["real_subset"]["frechet"]
                             for s in range(5))


def shortfalls(q: quality.DigitsQuality, real_frechet: float) -> list[str]:
    """Why a batch does not look like digits (empty when it passes every bound)."""
    out = []
    if q.confident < MIN_CONFIDENT:
        out.append(f"confident {q.confident:.3f} < {MIN_CONFIDENT}")
    if q.balance < MIN_BALANCE:
        out.append(f"balance {q.balance:.3f} < {MIN_BALANCE}")
    if q.frechet > MAX_FRECHET_RATIO * real_frechet:
        out.append(f"frechet {q.frechet:.1f} > {MAX_FRECHET_RATIO} x real {real_frechet:.1f}")
    return out


# -- the measure -----------------------------------------------------------------------------------

def test_load_real_digits_is_the_teachers_data():
    x = quality.load_real_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and 0.9 < x.max() <= 1.0
    train, held = quality.split_indices()
    assert len(train) == 1000 and len(held) == 797
    assert len(set(train.tolist()) | set(held.tolist())) == 1797


def test_real_digits_pass_and_noise_and_blank_fail(real_frechet):
    held = quality.measure_digits(quality.held_out_digits())
    assert held.confident > 0.8 and held.balance > 0.99 and held.frechet < 1e-6
    ref = quality.reference_figures(NUM, seed=7)
    assert ref["held_out"]["classifier_accuracy"] > 0.95
    real = quality.measure_digits(quality.load_real_digits()[quality.split_indices()[0][:NUM]])
    assert shortfalls(real, real_frechet) == []

    gen = torch.Generator().manual_seed(0)
    noise = quality.measure_digits(torch.randn(NUM, 1, 16, 16, generator=gen).clamp(-1, 1))
    blank = quality.measure_digits(-torch.ones(NUM, 1, 16, 16))
    for q in (noise, blank):
        assert q.confident < 0.1
        assert q.frechet > 10 * real_frechet
        assert len(shortfalls(q, real_frechet)) >= 2
    assert blank.balance == 0.0  # one class for all: not ten digits


def test_uint8_and_float_inputs_agree():
    x = quality.held_out_digits()[:NUM]  # (64, 1, 16, 16)
    x8 = to_uint8(x)  # (64, 16, 16, 1)
    a, b = quality.measure_digits(x8), quality.measure_digits(torch.from_numpy(x8).permute(0, 3, 1, 2)
                                                              .float() / 127.5 - 1)
    assert a == b
    assert abs(quality.measure_digits(x).frechet - a.frechet) < 1.0  # quantisation only


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8, 1), np.uint8), torch.zeros(4, 3, 16, 16),
                                 torch.zeros(4, 16, 16)])
def test_wrong_shapes_are_refused(bad):
    with pytest.raises(ShapeMismatchError, match="16"):
        quality.measure_digits(bad)


def test_missing_scikit_learn_is_a_user_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    quality._sklearn_digits.cache_clear()
    try:
        with pytest.raises(UserError, match="pip install scikit-learn"):
            quality.load_real_digits()
    finally:
        quality._sklearn_digits.cache_clear()


def test_classifier_training_is_seeded_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(quality, "CLASSIFIER_EPOCHS", 1)  # the recipe, shortened
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = quality._fit(torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)
    second = quality._fit(torch.Generator().manual_seed(0))
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


# -- the shipped teacher ---------------------------------------------------------------------------

@needs_shipped
@pytest.mark.slow
def test_shipped_teacher_samples_are_recognisable_digits(real_frechet):
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher("digits")
    assert teacher.sample_shape == (1, 16, 16) and teacher.num_parameters == 679_226
    images = generate(teacher, num=NUM, steps=50, seed=0)  # (64, 16, 16, 1) uint8
    q = quality.measure_digits(images)
    assert shortfalls(q, real_frechet) == [], q
    near = quality.nearest_real_distance(images)
    assert near["samples_median"] > 0.5 * near["real_median"]  # new digits, not copies


@needs_shipped
def test_sample_command_writes_pngs_and_a_grid_and_follows_the_seed(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)  # no stray ./dkdm.toml

    def sample(name: str, seed: int) -> np.ndarray:
        out = tmp_path / name
        code = run(["sample", "--teacher", "digits", "--num", "8", "--steps", "10", "--seed", str(seed),
                    "--out", str(out), "--grid", str(tmp_path / f"{name}.png"), "--quiet"])
        assert code == 0
        pngs = sorted(out.glob("*.png"))
        assert len(pngs) == 8
        assert (tmp_path / f"{name}.png").is_file()
        return np.stack([np.asarray(Image.open(p)) for p in pngs])  # (8, 16, 16)

    a, b, c = sample("a", 0), sample("b", 0), sample("c", 1)
    assert a.shape == (8, 16, 16) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@needs_shipped
def test_teachers_lists_digits_as_cached(capsys):
    assert run(["teachers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    assert rows["digits"]["cached"] is True
    assert rows["digits"]["parameters"] == 679_226
    assert rows["digits"]["recommended"]["distill"]["lr"] == 2e-3  # dkdm_cli/recommended.py
    assert rows["digits-cond"]["recommended"] == rows["digits"]["recommended"]
    assert all(not r["recommended"] for name, r in rows.items() if not name.startswith("digits"))


# -- the class-conditional digits teacher (issue 14) -----------------------------------------------

def test_conditional_training_starts_from_the_unconditional_teacher(tmp_path):
    """--init-from copies every weight and zeroes the label table: at the start the conditional
    model IS the unconditional one, for every label; another architecture is refused."""
    import sys

    from dkdm_cli.models import create_model
    from dkdm_cli.models.io import save_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_digits_teacher import init_from

    kw = dict(image_size=8, in_channels=1, learn_sigma=True, model_channels=8, channel_mult=(1, 2))
    torch.manual_seed(0)
    plain = create_model("unet-t", **kw)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(plain, tmp_path / "plain.safetensors")
    cond = create_model("unet-t", num_classes=10, class_null=True, **kw)
    init_from(cond, tmp_path / "plain.safetensors")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 400, 999])
    with torch.no_grad():
        want = plain(x, t)
        for label in (0, 7, 10):
            assert torch.allclose(cond(x, t, torch.full((3,), label)), want, atol=1e-6)
    other = create_model("unet-t", num_classes=10, class_null=True, **(kw | {"model_channels": 16}))
    with pytest.raises(Exception, match="wrong shape|not the unconditional"):
        init_from(other, tmp_path / "plain.safetensors")


SHIPPED_COND = builtin_weights("digits-cond")
needs_cond = pytest.mark.skipif(not SHIPPED_COND.is_file(), reason=f"{SHIPPED_COND} is absent")


@needs_cond
def test_digits_cond_is_registered_conditional_and_offline(tmp_path, capsys, monkeypatch):
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher("digits-cond")
    assert (teacher.num_classes, teacher.null_class) == (10, 10)
    assert teacher.num_parameters == 680_282
    monkeypatch.setenv("DKDM_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    rd = tmp_path / "run"
    assert run(["distill", "--teacher", "digits-cond", "--iterations", "2", "--batch-size", "4",
                "--run-dir", str(rd), "--quiet", "--set", "distill.rho=0.001",
                "--set", "distill.grid_every=0", "--set", "distill.init_steps=2"]) == 0
    assert run(["sample", "--model", str(rd), "--class", "4", "--cfg", "2", "--num", "2",
                "--steps", "2", "--grid", str(tmp_path / "g.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_counts"] == {"4": 2}


@needs_cond
@pytest.mark.slow
def test_digits_cond_draws_the_digit_it_is_asked_for():
    from dkdm_cli.teachers.spec import resolve_teacher

    teacher = resolve_teacher("digits-cond")
    labels = torch.arange(10).repeat(8)  # (80,)
    images = generate(teacher, num=80, steps=25, seed=0, labels=labels)
    assert quality.class_consistency(images, labels)["consistency"] > 0.8
