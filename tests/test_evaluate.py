"""`dkdm eval`: the numbers equal torch-fidelity's, sFID follows ADM, the offline weights path,
caches keyed by content, and the exit codes of --fail-above.

Inception runs at 299x299 on a CPU, so image sets are tiny (6-10 images) and FID comparisons use
torch-fidelity's "64" feature layer (the same code path as "2048", minus a 2048x2048
eigendecomposition that alone takes ~20 s here). All tests share one feature cache, so a set
scored twice is extracted once.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dkdm_cli.cli import run
from dkdm_cli.config import EvalConfig
from dkdm_cli.errors import OfflineError, UserError
from dkdm_cli.evaluate import evaluate, inception
from dkdm_cli.evaluate import metrics as M
from dkdm_cli.evaluate.inputs import FeatureCache, cache_dir, read_npz
from dkdm_cli.sample import save_npz, save_png_folder

FAST = M.MetricSettings(fid_layer="64", isc_splits=2, kid_subsets=10)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-cache")


@pytest.fixture(autouse=True)
def _eval_env(monkeypatch, shared_cache):
    monkeypatch.setenv("DKDM_CACHE_DIR", str(shared_cache))
    monkeypatch.delenv(inception.ENV_WEIGHTS, raising=False)


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    """(n, size, size, 3) uint8 blobs: smooth enough to look like images, distinct per seed."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _cfg(weights, reference: str, **kw) -> EvalConfig:
    # The test weights are random (torch-fidelity's real ones are a 95 MB download).
    return EvalConfig(reference=reference, inception_weights=str(weights), device="cpu",
                      batch_size=16, allow_unknown_inception=True, **kw)


# -- pure maths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [12, 60])  # below and above the dimension: both code paths
def test_frechet_helpers_equal_torch_fidelity_formula(n):
    gen = np.random.default_rng(0)
    x1, x2 = gen.normal(size=(n, 32)), gen.normal(0.3, 1.2, size=(n + 3, 32))
    s1, s2 = M.fid_statistics(x1.astype(np.float32)), M.fid_statistics(x2.astype(np.float32))
    expected = M.fid_from_statistics(s1, s2)  # torch-fidelity's own function
    f1, f2 = x1.astype(np.float32), x2.astype(np.float32)
    assert M.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == \
        pytest.approx(expected, rel=1e-5)
    assert M.frechet_distance_features(f1, f2) == pytest.approx(expected, rel=1e-5)
    assert M.frechet_distance_to_statistics(f1, s2["mu"], s2["sigma"]) == pytest.approx(expected, rel=1e-5)
    assert M.frechet_distance_features(x1, x1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("text", ["fid12", "fid=", "=3", "fid=abc", "bogus=1", "fid=nan", "fid=inf"])
def test_malformed_bounds_are_user_errors(text):
    with pytest.raises(UserError):
        M.parse_bound(text)


def test_bounds_and_aliases():
    b = M.parse_bound("IS=2.5")
    assert (b.metric, b.limit) == ("isc", 2.5)
    assert M.parse_bound("fid=12.5").crossed({"fid": 12.6})
    assert not M.parse_bound("fid=12.5").crossed({"fid": 12.5})
    assert M.parse_bound("fid=1").crossed({"fid": float("nan")})


# -- against torch-fidelity ---------------------------------------------------------------------

def test_fid_is_kid_prc_equal_torch_fidelity(inception_weights, tmp_path):
    from torch_fidelity import calculate_metrics

    fake, real = _images(8, seed=1), _images(8, seed=2)
    save_npz(fake, tmp_path / "fake.npz")
    save_png_folder(real, tmp_path / "real")
    ours = evaluate(str(tmp_path / "fake.npz"), cfg=_cfg(inception_weights, str(tmp_path / "real")),
                    metrics={"fid", "isc", "kid", "prc"}, settings=FAST)

    class Uint8Set(torch.utils.data.Dataset):
        def __len__(self):
            return len(fake)

        def __getitem__(self, i):
            return torch.from_numpy(fake[i]).permute(2, 0, 1).contiguous()  # (3, H, W) uint8

    theirs = calculate_metrics(
        input1=Uint8Set(), input2=str(tmp_path / "real"), cuda=False, batch_size=16,
        isc=True, fid=True, kid=True, prc=True, feature_extractor="inception-v3-compat",
        feature_layer_fid="64", isc_splits=2, kid_subsets=10, kid_subset_size=8,
        feature_extractor_weights_path=str(inception_weights), cache=False, verbose=False,
        save_cpu_ram=True)
    v = ours.values
    assert v["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert v["isc"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert v["isc_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-9)
    assert v["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert v["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert (v["precision"], v["recall"]) == (theirs["precision"], theirs["recall"])
    assert v["fid"] > 0 and v["isc"] > 1


def test_sfid_of_identical_sets_is_zero_and_features_are_cached(inception_weights, tmp_path,
                                                                monkeypatch, shared_cache):
    images = _images(6, seed=3)
    save_npz(images, tmp_path / "a.npz")
    save_png_folder(images, tmp_path / "same")  # same pixels, another container
    result = evaluate(str(tmp_path / "a.npz"), cfg=_cfg(inception_weights, str(tmp_path / "same")),
                      metrics={"sfid", "fid"}, settings=FAST)
    assert result.values["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert result.values["fid"] == pytest.approx(0.0, abs=1e-3)
    spatial = list((shared_cache / "eval" / "features").glob("*-spatial.npy"))
    assert spatial and np.load(spatial[0]).shape == (6, 17 * 17 * 7)  # ADM's 2023 dims

    def no_network(*a, **k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr("dkdm_cli.evaluate.scoring.build_extractor", no_network)
    again = evaluate(str(tmp_path / "a.npz"), cfg=_cfg(inception_weights, str(tmp_path / "a.npz")),
                     metrics={"sfid"}, settings=FAST)
    assert again.values["sfid"] == pytest.approx(0.0, abs=1e-6)


def test_reference_statistics_npz(inception_weights, tmp_path):
    """An ADM-style reference .npz (mu, sigma, mu_s, sigma_s) scores FID and sFID without images."""
    images = _images(6, seed=3)
    save_npz(images, tmp_path / "a.npz")
    first = evaluate(str(tmp_path / "a.npz"), cfg=_cfg(inception_weights, str(tmp_path / "a.npz")),
                     metrics={"sfid", "fid"}, settings=FAST)
    cached = FeatureCache(cache_dir(), first.extractor["weights_sha256"])
    feats = cached.get(first.samples["sha256"], ("64", "spatial"), 6)  # (6, 64), (6, 2023)
    x, xs = feats["64"].astype(np.float64), feats["spatial"].astype(np.float64)
    np.savez(tmp_path / "stats.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False),
             mu_s=xs.mean(0), sigma_s=np.cov(xs, rowvar=False))
    images_, stats = read_npz(tmp_path / "stats.npz")
    assert images_ is None and stats.mu_s.shape == (2023,)
    res = evaluate(str(tmp_path / "a.npz"), cfg=_cfg(inception_weights, str(tmp_path / "stats.npz")),
                   metrics={"sfid", "fid"}, settings=FAST)
    assert res.values["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert res.values["fid"] == pytest.approx(0.0, abs=1e-3)
    assert res.reference["kind"] == "npz" and res.reference["file_sha256"]
    with pytest.raises(UserError, match="need reference images"):
        evaluate(str(tmp_path / "a.npz"), cfg=_cfg(inception_weights, str(tmp_path / "stats.npz")),
                 metrics={"kid"})


def test_student_on_the_fly_against_cached_teacher_reference(inception_weights, tiny_run_dir):
    cfg = _cfg(inception_weights, "teacher", num=6, steps=2)
    first = evaluate(str(tiny_run_dir), cfg=cfg, metrics={"fid"}, settings=FAST)
    ref = first.reference
    assert ref["kind"] == "teacher" and ref["cached"] is False and ref["num"] == 6
    assert ref["seed"] != first.samples["seed"]  # an independent reference, not the same noise
    assert first.samples["generated"] and first.samples["ema"] is True
    again = evaluate(str(tiny_run_dir), cfg=cfg, metrics={"fid"}, settings=FAST)
    assert again.reference["cached"] is True
    assert again.reference["sha256"] == ref["sha256"]
    assert again.values["fid"] == first.values["fid"]
    record = again.to_dict()
    for key in ("sampler", "steps", "num", "seed"):
        assert key in record["samples"] and key in record["reference"]
    assert record["feature_extractor"]["weights_sha256"] and record["passed"]


# -- weights and offline --------------------------------------------------------------------------

def test_missing_weights_offline_says_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(OfflineError) as err:
        inception.resolve_weights(None)
    msg = str(err.value)
    assert inception.weights_url() in msg and str(inception.hub_weights_path()) in msg
    assert "--inception-weights" in msg and inception.ENV_WEIGHTS in msg


def test_offline_probe_never_hangs(monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DKDM_OFFLINE", raising=False)

    def slow(*a, **k):
        time.sleep(5)
        raise OSError("unreachable")

    monkeypatch.setattr(inception.socket, "create_connection", slow)
    start = time.perf_counter()
    assert inception.is_offline(timeout=0.2)
    assert time.perf_counter() - start < 2


def test_weights_found_in_torch_hub_cache_and_env(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = inception.hub_weights_path()
    hub.parent.mkdir(parents=True)
    hub.symlink_to(inception_weights)
    assert inception.resolve_weights(None, allow_unknown=True).source == "hub-cache"
    monkeypatch.setenv(inception.ENV_WEIGHTS, str(inception_weights))
    assert inception.resolve_weights(None, allow_unknown=True).source == "env"


def test_weights_are_never_unpickled(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(UserError):
        inception.load_state(path)


# -- CLI -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bound", ["fid12", "fid=abc", "nosuch=1"])
def test_cli_malformed_bound_exits_2(bound, tmp_path, capsys):
    save_npz(_images(4, seed=0), tmp_path / "s.npz")
    assert run(["eval", str(tmp_path / "s.npz"), "--fail-above", bound]) == 2
    assert "--fail-above" in capsys.readouterr().err


def test_cli_missing_weights_offline_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    save_npz(_images(4, seed=0), tmp_path / "s.npz")
    assert run(["eval", str(tmp_path / "s.npz"), "--fid"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "weights-inception-2015-12-05" in err and "--inception-weights" in err


def test_cli_crossed_bound_exits_1_with_full_json(inception_weights, tmp_path, capsys):
    save_npz(_images(10, seed=4), tmp_path / "s.npz")
    argv = ["eval", str(tmp_path / "s.npz"), "--isc", "--inception-weights", str(inception_weights),
            "--allow-unknown-inception", "--json"]
    assert run(argv + ["--fail-above", "isc=0.5"]) == 1
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["passed"] is False and record["bounds"][0]["crossed"] is True
    assert record["samples"]["sha256"] and record["feature_extractor"]["weights_sha256"]
    assert "isc" in captured.err and "> 0.5" in captured.err
    assert run(argv + ["--fail-above", "isc=1e9"]) == 0  # features cached: instant
    assert json.loads(capsys.readouterr().out)["passed"] is True


def test_cli_folder_samples_need_a_teacher_for_the_default_reference(inception_weights, tmp_path,
                                                                      capsys):
    save_png_folder(_images(4, seed=0), tmp_path / "imgs")
    code = run(["eval", str(tmp_path / "imgs"), "--fid", "--inception-weights", str(inception_weights),
                "--allow-unknown-inception"])
    assert code == 2 and "--teacher" in capsys.readouterr().err


def test_weights_of_another_network_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    weights = inception.InceptionWeights(tmp_path / "other.pth", "0", "flag")
    with pytest.raises(UserError, match="not torch-fidelity Inception weights"):
        inception.build_extractor(weights, {"2048"})


# -- issue 20: stored inputs checked first, known weights only, --cfg refused on stored images -----

def test_unknown_inception_weights_are_refused_unless_allowed(inception_weights, tmp_path, capsys):
    save_npz(_images(10, seed=4), tmp_path / "s.npz")
    argv = ["eval", str(tmp_path / "s.npz"), "--isc", "--inception-weights", str(inception_weights),
            "--json"]
    assert run(argv) == 2  # random weights of the right shapes: IS = 1 with no warning before
    err = " ".join(capsys.readouterr().err.split())
    assert "not that of torch-fidelity's Inception weights" in err and "--allow-unknown-inception" in err
    assert run(argv + ["--allow-unknown-inception"]) == 0
    extractor = json.loads(capsys.readouterr().out)["feature_extractor"]
    assert extractor["weights_known"] is False
    assert extractor["weights_sha256"] == inception.file_sha256(inception_weights)


def test_weights_with_torch_fidelitys_hash_are_known(inception_weights, monkeypatch):
    real = inception.file_sha256(inception_weights)
    monkeypatch.setattr(inception, "known_sha256_prefix", lambda: real[:8])
    weights = inception.resolve_weights(str(inception_weights))
    assert weights.known and weights.describe()["weights_known"] is True


def test_the_known_prefix_is_the_one_in_torch_fidelitys_file_name():
    assert inception.known_sha256_prefix() == "6726825d"
    assert inception.weights_url().endswith(f"-{inception.known_sha256_prefix()}.pth")


@pytest.mark.parametrize("where", ["samples", "reference"])
@pytest.mark.parametrize("damage,needle", [
    ("channels-first", "channels first"),
    ("float", "must be uint8"),
    ("mixed-sizes", "differs from the first image's"),
    ("unreadable", "not a readable image"),
])
def test_malformed_inputs_are_reported_before_the_weights_are_fetched(where, damage, needle,
                                                                       tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights anywhere, and offline
    good = tmp_path / "good.npz"
    save_npz(_images(4, seed=0), good)
    if damage in ("channels-first", "float"):
        bad = tmp_path / "bad.npz"
        arr = _images(4, seed=1)
        np.savez(bad, arr_0=arr.transpose(0, 3, 1, 2) if damage == "channels-first"
                 else arr.astype(np.float32))
    else:
        bad = tmp_path / "bad"
        save_png_folder(_images(4, seed=1), bad)
        if damage == "mixed-sizes":
            save_png_folder(_images(1, seed=2, size=8), bad, prefix="z")
        else:
            (bad / "000002.png").write_bytes(b"not a png")
    samples, reference = (bad, good) if where == "samples" else (good, bad)
    code = run(["eval", str(samples), "--fid", "--reference", str(reference)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and needle in err and "Inception weights are needed" not in err, err


def test_cfg_is_refused_on_stored_images_like_class(inception_weights, tmp_path, capsys):
    save_npz(_images(4, seed=0), tmp_path / "good.npz")
    for flag, value in (("--cfg", "2"), ("--class", "3")):
        code = run(["eval", str(tmp_path / "good.npz"), "--isc", flag, value, "--inception-weights",
                    str(inception_weights), "--allow-unknown-inception"])
        err = capsys.readouterr().err
        assert code == 2 and flag in err and "stored images" in err, err
