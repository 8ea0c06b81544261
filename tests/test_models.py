"""Every registered model honours one contract: model(x, t) -> C or 2C channels, gradients reach
every parameter, files round-trip exactly, and mistakes are named errors.

Forward/backward tests use tiny overrides of each preset so the file runs in seconds on 2 shared
CPU cores; full-size presets are only built on the meta device, for their parameter counts.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from dkdm_cli.cli import app
from dkdm_cli.errors import ModelFileError, RegistryError, ShapeMismatchError, UserError
from dkdm_cli.models import MODELS, ModelSpec, build_from_spec, count_parameters, create_model
from dkdm_cli.models._blocks import AttentionBlock
from dkdm_cli.models.io import META_KEY, load_model, save_model
from dkdm_cli.models.summary import summarize
from dkdm_cli.models.unet import _attention_ds

NAMES = MODELS.names()
SIZE = 8  # divisible by every preset's stride (UNet: 4 below 32px) and patch (2, 4)

# UNet width 24 is unet-t's own: GroupNorm then has 3 channels per group. With one channel per group
# (any width <= 32) a conv bias feeding a norm is normalised away and its gradient is exactly zero.
TINY = {
    "unet": dict(model_channels=24, num_res_blocks=1),
    "dit": dict(hidden_size=32, depth=2, num_heads=2),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run this file's tiny models on one intra-op thread.

    On 2 cores shared with training jobs, two threads spin-wait on each other: a tiny forward took
    up to 1.7 s with 2 threads and 0.02 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(name: str, *, channels: int = 3, learn_sigma: bool = True, size: int = SIZE) -> nn.Module:
    """A few-thousand-parameter version of preset `name` with its family's TINY overrides."""
    overrides = TINY[name.split("-")[0]]
    return create_model(name, image_size=size, in_channels=channels, learn_sigma=learn_sigma, **overrides)


def inputs(batch: int = 2, channels: int = 3, size: int = SIZE, seed: int = 0):
    """(x (B, C, H, W), t (B,)) with fixed values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,), generator=g)  # (B,)
    return x, t


# ---- the forward contract -------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_output_has_c_or_2c_channels(name: str, channels: int, learn_sigma: bool) -> None:
    model = tiny(name, channels=channels, learn_sigma=learn_sigma).eval()
    x, t = inputs(channels=channels)
    with torch.no_grad():
        out = model(x, t)  # (B, C or 2C, H, W)
    assert out.shape == (2, channels * (2 if learn_sigma else 1), SIZE, SIZE)
    assert torch.isfinite(out).all()


def test_fractional_timesteps_are_accepted() -> None:
    # Respaced samplers hand the model rescaled, non-integer timesteps.
    model = tiny("unet-t").eval()
    x, _ = inputs()
    with torch.no_grad():
        out = model(x, torch.tensor([0.5, 999.25]))
    assert out.shape == (2, 6, SIZE, SIZE)


def test_unet_runs_at_any_size_its_stride_divides() -> None:
    model = tiny("unet-t", channels=1).eval()  # stride 4
    with torch.no_grad():
        out = model(torch.randn(1, 1, 12, 16), torch.tensor([10]))  # (1, 2, 12, 16)
    assert out.shape == (1, 2, 12, 16)
    with pytest.raises(ShapeMismatchError, match="stride 4"):
        model(torch.randn(1, 1, 10, 16), torch.tensor([10]))


@pytest.mark.parametrize("name", ["unet-t", "dit-t/2"])
def test_wrong_input_shape_is_a_named_error(name: str) -> None:
    model = tiny(name, channels=3)
    with pytest.raises(ShapeMismatchError, match="channels|3x8x8"):
        model(torch.randn(1, 1, SIZE, SIZE), torch.tensor([1]))
    if name.startswith("dit"):
        with pytest.raises(ShapeMismatchError, match="built for 3x8x8"):
            model(torch.randn(1, 3, 16, 16), torch.tensor([1]))


# ---- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = tiny(name)
    x, t = inputs()
    model(x, t).square().mean().backward()
    # Zero-initialised outputs (ADM's zero convs, adaLN-Zero) make most gradients zero at init:
    # here only the graph is checked.
    unreached = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unreached, f"no gradient reaches {unreached}"

    # With the zero-initialised tensors given random values every parameter must learn something.
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    out = model(x, t)  # (B, 2C, H, W)
    (out - torch.randn_like(out)).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not dead, f"zero gradient for {dead}"


# ---- initialisation and files ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_init(name: str) -> None:
    torch.manual_seed(123)
    a = tiny(name).state_dict()
    torch.manual_seed(123)
    b = tiny(name).state_dict()
    torch.manual_seed(124)
    c = tiny(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "init ignores the seed"


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_is_exact(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny(name, channels=1).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-zero outputs, so equality means something
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "m.safetensors"
    save_model(model, path, extra={"note": "hello"})
    loaded, doc = load_model(path)
    loaded.eval()
    x, t = inputs(channels=1)
    with torch.no_grad():
        assert torch.equal(model(x, t), loaded(x, t))
    assert doc["model"] == model.spec.to_dict()
    assert doc["format"] == "dkdm-model" and doc["format_version"] == 1
    assert doc["dkdm_version"] and doc["note"] == "hello"
    assert type(loaded) is type(model) and loaded.spec == model.spec


def test_alias_resolves_to_canonical_name_in_spec() -> None:
    with torch.device("meta"):
        model = create_model("dit-s", image_size=32, in_channels=3, learn_sigma=True)
    assert model.spec.name == "dit-s/2"
    # The spec survives JSON (tuples come back as lists) and rebuilds the same architecture.
    spec = ModelSpec.from_dict(json.loads(json.dumps(
        create_model("unet-t", image_size=8, in_channels=1, learn_sigma=False,
                     channel_mult=(1, 2)).spec.to_dict())))
    rebuilt = build_from_spec(spec)
    assert rebuilt.stride == 2 and rebuilt.out_channels == 1


@pytest.fixture
def saved(tmp_path):
    """(path, tensors, metadata) of a saved tiny unet-t."""
    path = tmp_path / "m.safetensors"
    save_model(tiny("unet-t", channels=1), path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    return path, tensors, meta


def test_missing_key_is_named(saved) -> None:
    path, tensors, meta = saved
    del tensors["out.2.weight"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=r"missing: out\.2\.weight"):
        load_model(path)


def test_unexpected_key_is_named(saved) -> None:
    path, tensors, meta = saved
    tensors["extra.head.weight"] = torch.zeros(3)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=r"unexpected: extra\.head\.weight"):
        load_model(path)


def test_wrong_shape_is_named(saved) -> None:
    path, tensors, meta = saved
    tensors["out.2.bias"] = torch.zeros(7)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match=r"wrong shape: out\.2\.bias"):
        load_model(path)


def test_corrupt_and_truncated_files_are_named(saved, tmp_path) -> None:
    path, _, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a model" * 10)
    for bad in (truncated, garbage):
        with pytest.raises(ModelFileError, match="not a readable safetensors file"):
            load_model(bad)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model(tmp_path / "absent.safetensors")


def test_foreign_safetensors_is_not_a_dkdm_file(tmp_path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="not a dkdm model file"):
        load_model(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format_version=99), "unsupported model format"),
        (lambda d: d["model"].update(name="unet-zz"), "unknown model 'unet-zz'"),
        (lambda d: d.pop("model"), "no model description"),
    ],
)
def test_bad_metadata_is_named(saved, edit, message: str) -> None:
    path, tensors, meta = saved
    doc = json.loads(meta[META_KEY])
    edit(doc)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(doc)})
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_loading_never_unpickles(saved, monkeypatch) -> None:
    path, _, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_model(path)
    # A pickle renamed to .safetensors is refused as unreadable, not executed.
    fake = path.with_name("pickled.safetensors")
    fake.write_bytes(pickle.dumps({"w": [1.0]}))
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        load_model(fake)


# ---- sizes, fitting and the catalog ---------------------------------------------------------

# Released presets never change: a model file records only the preset name and its arguments.
# Learned variance; (32x32x3, 16x16x1).
PINNED_COUNTS = {
    "dit-n/2": (330_072, 328_520),
    "dit-n/4": (337_056, 330_848),
    "dit-t/2": (1_274_520, 1_271_432),
    "dit-t/4": (1_288_416, 1_276_064),
    "dit-s/2": (32_476_056, 32_466_824),
    "dit-s/4": (32_517_600, 32_480_672),
    "dit-b/2": (129_537_816, 129_519_368),
    "dit-b/4": (129_620_832, 129_547_040),
    "dit-l/2": (456_803_352, 456_778_760),
    "dit-xl/2": (673_667_736, 673_640_072),
    "unet-n": (410_518, 300_082),
    "unet-t": (947_454, 679_226),
    "unet-s": (14_301_446, 9_975_554),
    "unet-m": (24_866_214, 17_399_138),
    "unet-b": (57_094_662, 39_824_898),
}


def meta_count(name: str, size: int, channels: int, **overrides) -> int:
    """Parameter count of a full-size preset, built without memory on the meta device."""
    with torch.device("meta"):
        model = create_model(name, image_size=size, in_channels=channels, learn_sigma=True, **overrides)
    return count_parameters(model)


def test_every_preset_is_pinned() -> None:
    assert set(PINNED_COUNTS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_preset_parameter_counts(name: str) -> None:
    assert (meta_count(name, 32, 3), meta_count(name, 16, 1)) == PINNED_COUNTS[name]


def test_preset_sizes_match_the_issue_and_papers() -> None:
    m = {n: meta_count(n, 32, 3) / 1e6 for n in ("unet-t", "unet-s", "unet-m", "unet-b")}
    assert m["unet-t"] < 1 and 13.5 < m["unet-s"] < 14.5 and 24 < m["unet-m"] < 32
    assert 56 < m["unet-b"] < 58
    # DiT paper (class-conditional, so about 1001 x hidden more than ours): S 33M, B 130M,
    # L 458M, XL 675M.
    for name, paper in (("dit-s/2", 33.0), ("dit-b/2", 130.3), ("dit-l/2", 458.0), ("dit-xl/2", 675.1)):
        assert abs(meta_count(name, 32, 4) / 1e6 - paper) / paper < 0.02, name
    # improved-diffusion's CIFAR-10 model (no resampling ResBlocks), counted with its own code.
    assert meta_count("unet-b", 32, 3, resblock_updown=False) == 52_546_438


def test_unet_t_digits_teacher_layout_is_frozen() -> None:
    # The built-in digits teacher was trained on this exact module tree; its file must keep loading.
    with torch.device("meta"):
        model = create_model("unet-t", image_size=16, in_channels=1, learn_sigma=True)
    state = model.state_dict()
    listing = "\n".join(f"{k}:{tuple(state[k].shape)}" for k in sorted(state))
    digest = hashlib.sha256(listing.encode()).hexdigest()
    assert len(state) == 184 and count_parameters(model) == 679_226
    assert digest == "6fc8e9bbc47ad03eabfbe560e5cc54e424db47136888627a67b874d7e841f460"


def attention_map_sizes(model: nn.Module, size: int) -> list[int]:
    """Side of the feature map each AttentionBlock sees in one forward."""
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[-1]))
             for m in model.modules() if isinstance(m, AttentionBlock)]
    with torch.no_grad():
        model(torch.zeros(1, model.in_channels, size, size), torch.zeros(1))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize(("name", "size", "channels"), [("unet-b", 32, 3), ("unet-t", 16, 1)])
def test_unet_attention_sits_at_16_and_8_pixel_maps(name: str, size: int, channels: int) -> None:
    model = create_model(name, image_size=size, in_channels=channels, learn_sigma=True,
                         model_channels=8, num_res_blocks=1, num_heads=1)
    middle = size // model.stride  # the middle block always attends
    sizes = attention_map_sizes(model, size)
    assert set(sizes) - {middle} == {16, 8} and middle in sizes


def test_attention_ds_only_names_existing_levels() -> None:
    assert _attention_ds(32, (1, 2, 2, 2)) == (2, 4)  # improved-diffusion's "16,8" at 32px
    assert _attention_ds(64, (1, 2, 3, 4)) == (4, 8)
    assert _attention_ds(16, (1, 2, 2)) == (1, 2)
    # 24 // 8 = 3 is no level's ds; attention must not silently vanish.
    assert _attention_ds(24, (1, 2, 2)) == (4,)


@pytest.mark.parametrize(
    ("name", "size", "match"),
    [("dit-s/4", 6, "patch size 4 does not divide image size 6"),
     ("dit-t/2", 9, "patch size 2"),
     ("unet-s", 30, "not divisible by this UNet's stride 4")],
)
def test_student_that_cannot_fit_is_a_user_error(name: str, size: int, match: str) -> None:
    with torch.device("meta"), pytest.raises(ShapeMismatchError, match=match) as info:
        create_model(name, image_size=size, in_channels=3, learn_sigma=True)
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize(
    ("name", "overrides", "match"),
    [("dit-s", dict(hidden_size=30), "divisible by 4"),
     ("dit-s", dict(hidden_size=64), "does not split into 6 heads"),
     ("unet-t", dict(model_channels=25), "do not split into 2 heads"),
     ("unet-t", dict(modle_channels=8), "modle_channels")],
)
def test_bad_overrides_are_user_errors(name: str, overrides: dict, match: str) -> None:
    with torch.device("meta"), pytest.raises(UserError, match=match):
        create_model(name, image_size=16, in_channels=3, learn_sigma=True, **overrides)


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(RegistryError, match="Did you mean 'dit-s'"):
        create_model("dit_s", image_size=32, in_channels=3, learn_sigma=True)


def test_gflops_count_attention() -> None:
    # DiT-S/2 at 32x32x3: 256 tokens of width 384. Per block 12*D^2*N MACs in linear layers plus
    # 2*N^2*D in QK^T and AV; 2 FLOPs per MAC. The small embeddings make up the rest (< 2%).
    n, d, depth = 256, 384, 12
    expected = 2 * depth * (12 * d * d * n + 2 * n * n * d) / 1e9
    row = summarize("dit-s/2", image_size=32, channels=3)
    assert row.fits and row.parameters == PINNED_COUNTS["dit-s/2"][0]
    assert expected < row.gflops < 1.02 * expected


def test_students_json_lists_every_model_and_fit() -> None:
    result = CliRunner().invoke(app, ["students", "--image-size", "6", "--channels", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {r["name"]: r for r in doc["students"]}
    assert list(rows) == NAMES and doc["image_size"] == 6 and doc["channels"] == 1
    assert rows["dit-t/2"]["fits"] and rows["dit-t/2"]["parameters"] > 0 and rows["dit-t/2"]["gflops"] > 0
    assert rows["dit-t/2"]["aliases"] == ["dit-t"]
    assert not rows["dit-t/4"]["fits"] and "patch size 4" in rows["dit-t/4"]["reason"]
    assert rows["dit-t/4"]["parameters"] is None
    assert not rows["unet-t"]["fits"] and "stride" in rows["unet-t"]["reason"]


def test_students_table_prints() -> None:
    result = CliRunner().invoke(app, ["students", "--image-size", "8", "--channels", "4"])
    assert result.exit_code == 0, result.output
    assert "unet-t" in result.stdout and "dit-xl/2" in result.stdout


# ---- class-conditional presets (issue 14) -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_takes_a_label_table(name: str, tmp_path) -> None:
    """Labels change the output, the null row is one more table row, every table row learns, and
    the conditional model saves and loads exactly; missing labels are refused."""
    torch.manual_seed(0)
    overrides = TINY[name.split("-")[0]]
    plain = create_model(name, image_size=SIZE, in_channels=1, learn_sigma=True, **overrides)
    model = create_model(name, image_size=SIZE, in_channels=1, learn_sigma=True, num_classes=5,
                         class_null=True, **overrides)
    table = model.label_emb if name.startswith("unet") else model.y_embedder
    assert table.num_embeddings == 6 and (model.num_classes, model.null_class) == (5, 5)
    assert count_parameters(model) - count_parameters(plain) == 6 * table.embedding_dim
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    x, t = inputs(channels=1)
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([5, 5]))
    assert not torch.allclose(a, b)
    y = torch.tensor([2, 5])
    (model(x, t, y) - torch.randn_like(a)).square().mean().backward()
    rows = table.weight.grad.abs().sum(1)
    assert rows[2] > 0 and rows[5] > 0 and rows[0] == 0  # only the labels used learn
    with pytest.raises(ShapeMismatchError, match="class labels are required"):
        model(x, t)
    with pytest.raises(ShapeMismatchError, match="refused by an unconditional"):
        plain(x, t, y)
    path = tmp_path / "cond.safetensors"
    save_model(model, path)
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), loaded.eval()(x, t, y))
    assert (loaded.num_classes, loaded.null_class) == (5, 5)
