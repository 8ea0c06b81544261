"""Class-conditional DiT teachers in diffusers format (facebook/DiT-XL-2-256 and any DiTPipeline
folder): the real DiT-XL/2 architecture built on the meta device from the hub's config files
(tests/fixtures/hub/facebook--DiT-XL-2-256, provenance in its README), and a tiny DiTPipeline
written by diffusers itself and loaded end to end: labels, the null class, classifier-free
guidance, the latent scale, strict weights, the hub cache and `dkdm distill`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dkdm_cli import testing
from dkdm_cli.errors import ModelFileError, TeacherError, UserError
from dkdm_cli.teachers.diffusers_dit import DiffusersDiT, dit_config, is_dit_config
from dkdm_cli.teachers.diffusers_folder import load_diffusers_teacher, plan_folder
from dkdm_cli.teachers.diffusers_io import build_on_meta
from dkdm_cli.teachers.registry import TEACHERS

pytestmark = pytest.mark.usefixtures("no_network")

DIT = Path(__file__).parent / "fixtures" / "hub" / "facebook--DiT-XL-2-256"
TINY_CLASSES = testing.DIT_CLASSES


def _x(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _dit_snapshot(tmp_path: Path, *, model_index: bool = True) -> Path:
    """The fixture laid out as a hub snapshot (reconstructed/partial files under their real names)."""
    folder = tmp_path / "dit-xl-2-256"
    shutil.copytree(DIT, folder)
    for path in list(folder.rglob("*.json")):
        for tag in (".reconstructed", ".partial"):
            if tag in path.name:
                path.rename(path.with_name(path.name.replace(tag, "")))
    if not model_index:
        (folder / "model_index.json").unlink()
    return folder


# -- the real DiT-XL/2 256 architecture, from the hub's configs -------------------------------

def test_dit_xl2_256_config_builds_the_registered_architecture():
    from diffusers import Transformer2DModel

    raw = _config(DIT / "transformer" / "config.reconstructed.json")
    assert raw["_class_name"] == "Transformer2DModel" and is_dit_config(raw)
    built = dit_config(raw, source="dit")
    assert "cross_attention_dim" not in built and built["num_embeds_ada_norm"] == 1000
    model = build_on_meta(Transformer2DModel, built, source="dit")
    assert type(model).__name__ == "DiTTransformer2DModel"  # diffusers' own remap
    remapped = build_on_meta(Transformer2DModel, raw, source="dit")  # the raw config, all keys
    assert type(remapped) is type(model)
    assert {k: v.shape for k, v in remapped.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert all(p.is_meta for p in model.parameters())
    entry = TEACHERS.create("dit-xl2-256")
    assert sum(p.numel() for p in model.parameters()) == entry.parameters == 749_826_464
    # DiT's sin-cos position table is a non-persistent buffer: computed, never read from a file.
    pos = dict(model.named_buffers())["pos_embed.pos_embed"]
    assert not pos.is_meta and pos.shape == (1, (32 // 2) ** 2, 16 * 72)
    # Learned sigma: 8 output channels = 2 x 4 latent channels.
    assert (model.config.in_channels, model.out_channels) == (4, 8) == (entry.channels, 2 * entry.channels)
    assert model.config.sample_size == entry.image_size == 32
    wrapped = DiffusersDiT(model)
    table = wrapped.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 1001  # 1000 classes + the dropped-label row
    assert (wrapped.num_classes, wrapped.null_class) == (1000, 1000)
    assert (entry.num_classes, entry.null_class) == (1000, 1000)


def test_dit_xl2_256_folder_plan_matches_its_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler

    plan = plan_folder(_dit_snapshot(tmp_path))
    assert plan.kind == "dit" and plan.pipeline == "DiTPipeline" and plan.num_classes == 1000
    assert plan.denoiser_dir.name == "transformer" and plan.sample_shape == (4, 32, 32)
    s = plan.settings
    assert (s.schedule, s.num_timesteps, s.beta_start, s.beta_end) == ("linear", 1000, 0.0001, 0.02)
    # No variance_type in a DDIM config: 8 output channels make it DiT's learned range.
    assert (s.prediction, s.variance, s.clip_denoised, s.timestep_scale) == \
        ("epsilon", "learned_range", False, 1.0)
    reference = DDIMScheduler.from_config(plan.scheduler)  # DiTPipeline's scheduler
    torch.testing.assert_close(s.build().betas.float(), reference.betas)
    assert reference.config.clip_sample is False
    # The VAE config has no scaling_factor (saved before it was a config key): DiT's 0.18215.
    raw_vae = _config(plan.autoencoder_dir / "config.json")
    assert "scaling_factor" not in raw_vae
    assert (plan.latent_scale.scaling_factor, plan.latent_scale.source) == (0.18215, "dit-default")
    assert TEACHERS.create("dit-xl2-256").decode_scale == plan.latent_scale.scaling_factor
    vae = build_on_meta(AutoencoderKL, raw_vae, source="vae")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    factor = 2 ** (len(raw_vae["block_out_channels"]) - 1)
    assert 256 // factor == plan.sample_shape[1] and raw_vae["latent_channels"] == plan.sample_shape[0]
    # The same folder without model_index.json: still 0.18215, but as diffusers' guess.
    assert plan_folder(_dit_snapshot(tmp_path / "bare", model_index=False)).latent_scale.source == \
        "diffusers-default"


def test_non_dit_transformers_are_refused_by_name(tmp_path):
    folder = _dit_snapshot(tmp_path)
    path = folder / "transformer" / "config.json"
    raw = _config(path)
    for change, message in ((dict(norm_type="layer_norm"), "not a DiT"),
                            (dict(cross_attention_dim=1024), "cross_attention_dim"),
                            (dict(_class_name="SD3Transformer2DModel"), "not supported"),
                            (dict(num_embeds_ada_norm=None), "num_embeds_ada_norm"),
                            (dict(sample_size=33), "multiple of patch_size")):
        path.write_text(json.dumps({**raw, **change}))
        with pytest.raises(TeacherError, match=message):
            plan_folder(folder)
    path.write_text(json.dumps({**raw, "in_channels": 3, "out_channels": 6}))
    with pytest.raises(TeacherError, match="4-channel latents, the denoiser takes 3"):
        plan_folder(folder)


def test_hub_download_includes_the_transformer_folder():
    from dkdm_cli.teachers.hub import allow_patterns

    files = ["model_index.json", "scheduler/scheduler_config.json", "transformer/config.json",
             "transformer/diffusion_pytorch_model.bin", "vae/config.json",
             "vae/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.safetensors"]
    patterns = allow_patterns(files)
    assert "transformer/*.json" in patterns and "transformer/diffusion_pytorch_model.bin*" in patterns
    assert "vae/diffusion_pytorch_model*.safetensors*" in patterns
    assert "vae/diffusion_pytorch_model.bin*" not in patterns
    safe = allow_patterns([*files, "transformer/diffusion_pytorch_model.safetensors"])
    assert "transformer/diffusion_pytorch_model*.safetensors*" in safe
    assert "transformer/diffusion_pytorch_model.bin*" not in safe
    assert "transformer/diffusion_pytorch_model.bin*" in allow_patterns(None)


# -- a tiny DiTPipeline, end to end ------------------------------------------------------------

write_tiny_dit_folder = testing.write_dit_folder


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory) -> Path:
    return write_tiny_dit_folder(tmp_path_factory.mktemp("dit") / "tiny-dit")


@pytest.fixture(scope="module")
def tiny_dit(tiny_dit_dir):
    """(the teacher, diffusers' own transformer from the same folder)."""
    from diffusers import DiTTransformer2DModel

    reference = DiTTransformer2DModel.from_pretrained(str(tiny_dit_dir / "transformer")).eval()
    return load_diffusers_teacher(tiny_dit_dir), reference


def test_tiny_dit_folder_is_a_conditional_latent_teacher(tiny_dit, tiny_dit_dir):
    teacher, _ = tiny_dit
    assert teacher.conditional and teacher.num_classes == TINY_CLASSES
    assert teacher.null_class == TINY_CLASSES and teacher.label_count == TINY_CLASSES + 1
    assert teacher.sample_shape == (4, 8, 8) and teacher.learn_sigma
    assert teacher.info["pipeline"] == "DiTPipeline"
    assert teacher.info["weights"] == ["diffusion_pytorch_model.safetensors"]
    assert teacher.autoencoder is not None and teacher.autoencoder.scaling_factor == pytest.approx(0.18215)
    assert not any(t.is_meta for t in [*teacher.model.parameters(), *teacher.model.buffers()])
    assert "AutoencoderKL" in teacher.space_note() and "not clipped" in teacher.space_note()
    with pytest.raises(UserError, match="0..3"):
        teacher.check_labels(torch.tensor([0, TINY_CLASSES + 1]))


def test_tiny_dit_runs_diffusers_own_function(tiny_dit):
    teacher, reference = tiny_dit
    x, t, y = _x((3, 4, 8, 8)), torch.tensor([0, 17, 49]), torch.tensor([0, 2, 1])
    out = teacher.model_output(x, t, y)
    with torch.no_grad():
        expected = reference(x, timestep=t, class_labels=y).sample
    assert out.shape == (3, 8, 8, 8)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # No labels: the null class, i.e. the unconditional model.
    null = torch.full((3,), TINY_CLASSES)
    torch.testing.assert_close(teacher.model_output(x, t), teacher.model_output(x, t, null))
    assert not torch.allclose(teacher.model_output(x, t), out)


def test_tiny_dit_cfg_is_dits_guidance(tiny_dit):
    """denoise_fn(y, cfg=s): eps_u + s (eps_c - eps_u) on the 4 latent channels, the learned
    variance from the conditional half: DiT's forward_with_cfg and DiTPipeline's rule."""
    teacher, reference = tiny_dit
    x, t, y = _x((2, 4, 8, 8), seed=2), torch.tensor([5, 30]), torch.tensor([1, 2])
    guided = teacher.denoise_fn(y, cfg=4.0)(x, t)
    with torch.no_grad():
        cond = reference(x, timestep=t, class_labels=y).sample
        uncond = reference(x, timestep=t, class_labels=torch.full_like(y, TINY_CLASSES)).sample
    eps = uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(guided, torch.cat([eps, cond[:, 4:]], dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.denoise_fn(y, cfg=1.0)(x, t), cond, atol=1e-6, rtol=1e-6)


def test_tiny_dit_reverse_step_is_ddpms_learned_range(tiny_dit):
    """DiT samples with its learned-range ancestral step; diffusers' DDPMScheduler with
    variance_type learned_range computes the same from the same 8-channel output."""
    from diffusers import DDPMScheduler

    teacher, reference = tiny_dit
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="linear", clip_sample=False,
                              variance_type="learned_range")
    x, y = _x((2, 4, 8, 8), seed=3), torch.tensor([0, 1])
    for step in (49, 20, 1):
        t = torch.full((2,), step)
        with torch.no_grad():
            out = reference(x, timestep=t, class_labels=y).sample
        mean, log_var = teacher.reverse_step_distribution(x, t, y)
        ddpm = scheduler.step(out, step, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(mean + torch.exp(0.5 * log_var) * noise, ddpm, atol=1e-4, rtol=1e-4)


def test_tiny_dit_decodes_at_its_scale(tiny_dit, tiny_dit_dir):
    from diffusers import AutoencoderKL

    teacher, _ = tiny_dit
    vae = AutoencoderKL.from_pretrained(str(tiny_dit_dir / "vae")).eval()
    z = _x((2, 4, 8, 8), seed=4)
    with torch.no_grad():
        expected = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)  # DiTPipeline
    torch.testing.assert_close(teacher.decode(z), expected, atol=1e-5, rtol=1e-5)


def test_tiny_dit_as_the_hub_published_it(tmp_path, tiny_dit_dir, tiny_dit):
    """The transformer config as the hub repo has it (Transformer2DModel with its 2023 keys)
    loads into the same function."""
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_dit_dir, folder)
    path = folder / "transformer" / "config.json"
    raw = _config(path)
    legacy = {**raw, "_class_name": "Transformer2DModel", "cross_attention_dim": None,
              "num_vector_embeds": None, "only_cross_attention": False, "use_linear_projection": False}
    path.write_text(json.dumps(legacy))
    teacher = load_diffusers_teacher(folder)
    x, t, y = _x((2, 4, 8, 8)), torch.tensor([3, 9]), torch.tensor([2, 0])
    torch.testing.assert_close(teacher.model_output(x, t, y), tiny_dit[0].model_output(x, t, y),
                               rtol=0, atol=0)


def test_tiny_dit_weights_load_strictly(tmp_path, tiny_dit_dir):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "bad"
    shutil.copytree(tiny_dit_dir, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    table = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    for bad, message in (({k: v for k, v in state.items() if k != table}, f"missing: {table}"),
                         ({**state, "extra.weight": torch.zeros(1)}, "unexpected: extra.weight"),
                         ({**state, table: torch.zeros(TINY_CLASSES, 16)}, f"wrong shape: {table}")):
        save_file(bad, str(weights))
        with pytest.raises(ModelFileError, match=message.replace(".", r"\.")):
            load_diffusers_teacher(folder)


def test_registered_dit_loads_from_the_hub_cache(hf_offline_cache, tiny_dit_dir):
    from dkdm_cli.teachers.spec import resolve_teacher

    entry = TEACHERS.create("dit-xl2-256")
    assert entry.source == "hf:facebook/DiT-XL-2-256" and entry.latent and entry.revision is None
    assert not entry.is_cached()
    hf_offline_cache.add("facebook/DiT-XL-2-256", tiny_dit_dir)
    assert entry.is_cached()
    teacher = resolve_teacher("dit-xl2-256")
    assert teacher.name == "dit-xl2-256" and teacher.conditional and teacher.null_class == TINY_CLASSES
    assert teacher.source == "hf:facebook/DiT-XL-2-256"


def test_teachers_lists_classes(capsys):
    from dkdm_cli.cli import run

    assert run(["teachers", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["teachers"]}
    assert (rows["dit-xl2-256"]["num_classes"], rows["dit-xl2-256"]["null_class"]) == (1000, 1000)
    assert rows["dit-xl2-256"]["decode_scale"] == 0.18215 and rows["dit-xl2-256"]["channels"] == 4
    assert (rows["adm-256-cond"]["num_classes"], rows["adm-256-cond"]["null_class"]) == (1000, None)
    assert rows["ddpm-cifar10"]["num_classes"] == 0
    assert run(["teachers"]) == 0
    assert "1000+null" in capsys.readouterr().out


@pytest.mark.slow
def test_distill_from_a_tiny_dit_folder(tmp_path, tiny_dit_dir):
    from dkdm_cli import api
    from dkdm_cli.cli import run

    run_dir = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_dit_dir), "--student", "dit-n/2", "--iterations", "2",
            "--batch-size", "4", "--run-dir", str(run_dir), "--quiet",
            "--set", "distill.rho=0.1", "--set", "distill.init_steps=3",
            "--set", "distill.log_every=1", "--set", "distill.save_every=2",
            "--set", "distill.grid_every=0"]
    assert run(args) == 0
    student = api.load_student(run_dir)
    assert student.sample_shape == (4, 8, 8) and student.autoencoder is not None
    assert student.conditional and student.num_classes == TINY_CLASSES
    out = student.model_output(_x((2, 4, 8, 8)), torch.tensor([0, 49]), torch.tensor([0, 2]))
    assert out.shape == (2, 8, 8, 8) and torch.isfinite(out).all()
