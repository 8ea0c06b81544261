"""`dkdm eval`'s work: open the samples and the reference, check them, extract features and
score (the package docstring, dkdm_cli/evaluate/__init__.py, says what and how)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dkdm_cli import __version__
from dkdm_cli._device import resolve_device
from dkdm_cli.config import EvalConfig
from dkdm_cli.errors import TeacherError, UserError
from dkdm_cli.evaluate import metrics as M
from dkdm_cli.evaluate.inception import (
    POOL,
    SPATIAL,
    FeatureExtractor,
    InceptionWeights,
    build_extractor,
    file_sha256,
    resolve_weights,
)
from dkdm_cli.evaluate.inputs import (
    FeatureCache,
    ImageSet,
    ReferenceStats,
    array_images,
    cache_dir,
    folder_images,
    read_npz,
    reference_cache_path,
    store_reference,
    teacher_identity,
)
from dkdm_cli.evaluate.metrics import Bound, MetricSettings, parse_bound
from dkdm_cli.precision import sampling_policy

# Teacher references use seed + this offset: independent of the students' noise (seed) and of
# their per-step noise (seed + 1), so the score is an ordinary two-sample FID.
REFERENCE_SEED_OFFSET = 1_000_003

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(n)


def _no_progress(label: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class EvalResult:
    """Scores plus everything needed to reproduce them."""

    values: dict[str, float]
    samples: dict[str, Any]
    reference: dict[str, Any]
    extractor: dict[str, Any]
    settings: dict[str, Any]
    bounds: list[Bound] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def crossed(self) -> list[Bound]:
        """The --fail-above bounds this result violates."""
        return [b for b in self.bounds if b.crossed(self.values)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `dkdm eval --json` prints)."""
        return {
            "metrics": self.values, "samples": self.samples, "reference": self.reference,
            "feature_extractor": self.extractor, "settings": self.settings,
            "bounds": [{"metric": b.metric, "limit": b.limit, "value": self.values[b.metric],
                        "crossed": b.crossed(self.values)} for b in self.bounds],
            "passed": not self.crossed, "seconds": round(self.seconds, 3),
            "dkdm_version": __version__,
        }


def requested_metrics(flags: Iterable[str], bounds: Iterable[Bound]) -> set[str]:
    """The metric flags to compute: those asked for plus those a bound needs (default: FID)."""
    wanted = set(flags) | {M.VALUES[b.metric][0] for b in bounds}
    unknown = wanted - set(M.METRIC_FLAGS)
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(sorted(unknown))}; "
                        f"choose from {', '.join(M.METRIC_FLAGS)}")
    return wanted or {"fid"}


# -- the samples -----------------------------------------------------------------------------

def _load_model(spec: str, *, ema: bool, device: str):
    from dkdm_cli.teachers.spec import load_denoiser

    return load_denoiser(spec, ema=ema, device=device)


def is_image_folder(path: Path) -> bool:
    """A folder to read images from, rather than a run directory or diffusers model."""
    from dkdm_cli.teachers.spec import classify

    try:
        classify(str(path))
    except TeacherError:
        return True
    return False


def _generate(model, *, cfg: EvalConfig, seed: int, num: int, device, progress: Progress,
              label: str) -> tuple[np.ndarray, Any]:
    """(images (N, H, W, C) uint8, class labels (N,) or None): a class-conditional model samples
    `cfg.classes` in turn (or all classes uniformly) at guidance `cfg.cfg_scale`."""
    from dkdm_cli.config import class_list
    from dkdm_cli.sample import generate, sample_labels

    model.to(device, dtype=sampling_policy(cfg.precision, device, what="eval.precision").network)
    labels = sample_labels(model, num, seed=seed, classes=class_list(cfg.classes))
    images = generate(model, num=num, steps=cfg.steps, sampler=cfg.sampler, eta=0.0, seed=seed,
                      batch_size=cfg.batch_size, device=device, on_batch=progress(label, num),
                      labels=labels, cfg=cfg.cfg_scale)
    return images, labels


def _resolved(model, cfg: EvalConfig) -> EvalConfig:
    """cfg with "auto" sampler and steps resolved for `model` (sample.resolve_sampling)."""
    from dkdm_cli.sample import resolve_sampling

    how = resolve_sampling(model, cfg.sampler, cfg.steps)
    return dataclasses.replace(cfg, sampler=how.sampler, steps=how.steps)


def _reference_cfg(model, cfg: EvalConfig) -> EvalConfig:
    """How the teacher reference is sampled: as the student (resolved), except beside a
    few-step student: IDDPM at 50 steps (sample.reference_sampling)."""
    from dkdm_cli.sample import DEFAULT_STEPS, Sampling, reference_sampling, resolve_sampling

    if model is not None:
        ref = reference_sampling(resolve_sampling(model, cfg.sampler, cfg.steps),
                                 model.diffusion.num_timesteps)  # a student has its teacher's T
    else:
        ref = Sampling("iddpm" if cfg.sampler == "auto" else cfg.sampler,
                       DEFAULT_STEPS if cfg.steps == "auto" else int(cfg.steps))
    return dataclasses.replace(cfg, sampler=ref.sampler, steps=ref.steps)


def _label_info(model, labels, cfg: EvalConfig) -> dict[str, Any]:
    if labels is None:
        return {}
    return {"classes": [int(c) for c in cfg.classes] or "all", "cfg_scale": cfg.cfg_scale,
            "num_classes": int(model.num_classes)}


def check_samples(spec: str) -> None:
    """Refuse samples that cannot be opened: a missing path, an unknown teacher name, a file
    of the wrong type (the rules stored_samples and sample_model apply, without loading anything)."""
    from dkdm_cli.teachers.spec import classify

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".npz" or path.is_dir():
        return
    if not path.exists() and Path(spec).suffix in (".npz", ".png", ".safetensors"):
        raise UserError(f"{spec}: no such file or folder")
    classify(spec)


def stored_samples(spec: str, cfg: EvalConfig) -> ImageSet | None:
    """The images of a folder or an .npz, every one checked now (readable, one size, uint8 NHWC),
    so a malformed input is refused before the Inception weights are fetched; None for a model
    to sample. --class and --cfg choose what a model samples, so they are refused here."""
    path = Path(spec).expanduser()
    is_npz = path.is_file() and path.suffix == ".npz"
    if not (is_npz or path.is_dir() and is_image_folder(path)):
        return None
    for flag, given in (("--class", bool(cfg.classes)), ("--cfg", cfg.cfg_scale != 1.0)):
        if given:
            raise UserError(f"{flag} sets what a model samples; {spec} holds stored images")
    if not is_npz:
        return folder_images(path, verify=True)
    images, _stats = read_npz(path)
    if images is None:
        raise UserError(f"{path}: holds statistics but no images (arr_0) to score")
    return images


def sample_model(spec: str, *, cfg: EvalConfig, ema: bool, device, progress: Progress,
                 check_model=None):
    """(ImageSet, model, class labels or None): `cfg.num` fresh samples of a run directory /
    exported student / teacher spec (with their labels when the model is class-conditional)."""
    model = _load_model(spec, ema=ema, device=str(device))
    if check_model is not None:  # refuse a model the metrics cannot score before sampling it
        check_model(model)
    cfg = _resolved(model, cfg)
    images, labels = _generate(model, cfg=cfg, seed=cfg.seed, num=cfg.num, device=device,
                               progress=progress, label="sampling")
    info = {"generated": True, "sampler": cfg.sampler, "steps": cfg.steps, "eta": 0.0,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "device": device.type,
            **_label_info(model, labels, cfg)}
    if isinstance(model.info, dict) and "step" in model.info:
        info.update(step=model.info["step"], ema=ema)
    return array_images(images, source=spec, info=info), model, labels


# -- the reference ---------------------------------------------------------------------------

def stored_reference(ref: str):
    """(ImageSet or None, ReferenceStats or None, description) of a folder or .npz reference,
    every image checked now, as for the samples; None for the teacher's samples."""
    if ref == "teacher":
        return None
    path = Path(ref).expanduser()
    if path.is_dir():
        images = folder_images(path, verify=True)
        return images, None, {"kind": "folder", "source": str(path)}
    if path.is_file() and path.suffix == ".npz":
        images, stats = read_npz(path)
        desc = {"kind": "npz", "source": str(path), "file_sha256": file_sha256(path),
                "statistics": stats is not None, "images": images is not None}
        return images, stats, desc
    raise UserError(f"--reference {ref}: expected 'teacher', a folder of images or an .npz "
                    "(arr_0 images and/or mu, sigma statistics); no such folder or .npz")


def _teacher_reference(model, teacher: str | None, *, num: int, cfg: EvalConfig, seed: int,
                       device, progress: Progress, use_cache: bool):
    from dkdm_cli.config import class_list
    from dkdm_cli.sample import recorded_teacher_spec, teacher_scale

    if model is not None:  # a student distilled on guided targets is scored against that target
        cfg = dataclasses.replace(cfg, cfg_scale=teacher_scale(model, cfg.cfg_scale),
                                  classes=class_list(cfg.classes))
    cfg = _reference_cfg(model, cfg)

    spec = teacher or (recorded_teacher_spec(model) if model is not None else None)
    if spec is None:
        raise UserError("the reference is the teacher's samples, but no teacher is known: give "
                        "--teacher SPEC (folders and .npz files record none), or --reference "
                        "FOLDER | STATS.npz")
    desc: dict[str, Any] = {}
    key = {"teacher": spec, "identity": teacher_identity(spec), "sampler": cfg.sampler,
           "steps": cfg.steps, "num": num, "seed": seed, "eta": 0.0,
           "batch_size": cfg.batch_size, "device": device.type}
    network = sampling_policy(cfg.precision, device, what="eval.precision").network
    if network is not torch.float32:  # float32 references keep the keys they had
        key["precision"] = str(network)
    if cfg.classes or cfg.cfg_scale != 1.0:  # keys of unconditional references stay as they were
        key.update(classes=list(cfg.classes), cfg_scale=cfg.cfg_scale)
        desc.update(classes=list(cfg.classes) or "all", cfg_scale=cfg.cfg_scale)
    path = reference_cache_path(key)
    desc = desc | {"kind": "teacher", "teacher": spec, "sampler": cfg.sampler, "steps": cfg.steps,
            "num": num, "seed": seed, "eta": 0.0, "batch_size": cfg.batch_size,
            "device": device.type, "cache_file": str(path)}
    if use_cache and path.is_file():
        images, _ = read_npz(path)
        if images is not None and images.num == num:
            return images, None, desc | {"cached": True}
    from dkdm_cli.api import load_teacher

    model_t = load_teacher(spec, device=str(device))
    arr, labels = _generate(model_t, cfg=cfg, seed=seed, num=num, device=device, progress=progress,
                            label="teacher reference")
    desc.update(_label_info(model_t, labels, cfg))
    if use_cache:
        store_reference(path, arr, key)
    return array_images(arr, source=f"teacher:{spec}"), None, desc | {"cached": False}


# -- features and scores ---------------------------------------------------------------------

class _Features:
    """Features per image set, from the cache when possible; the network is built lazily."""

    def __init__(self, weights: InceptionWeights, groups: set[str], *, device, batch_size: int,
                 progress: Progress, use_cache: bool) -> None:
        self.weights, self.groups, self.device = weights, groups, device
        self.batch_size, self.progress = batch_size, progress
        self.cache = FeatureCache(cache_dir(), weights.sha256) if use_cache else None
        self._net: FeatureExtractor | None = None

    def __call__(self, images: ImageSet, need: set[str], label: str) -> dict[str, np.ndarray]:
        if not need:
            return {}
        order = tuple(sorted(need))
        if self.cache is not None:
            hit = self.cache.get(images.sha256, order, images.num)
            if hit is not None:
                return hit
        if self._net is None:
            self._net = build_extractor(self.weights, self.groups, device=self.device)
        feats = self._net.extract(images.batches(self.batch_size),
                                  on_batch=self.progress(label, images.num))
        if self.cache is not None:
            self.cache.put(images.sha256, feats)
        return {g: feats[g] for g in order}


def compute(wanted: set[str], fs: dict[str, np.ndarray], fr: dict[str, np.ndarray],
            stats: ReferenceStats | None, s: MetricSettings) -> dict[str, float]:
    """Every requested value from sample features `fs` and reference features `fr`; stored
    reference statistics take precedence for FID / sFID, as in ADM's evaluator."""
    values: dict[str, float] = {}
    provided = _stats_provide(stats, s)
    if "fid" in wanted:
        mine = M.fid_statistics(fs[s.fid_layer])
        if "fid" in provided:
            theirs = {"mu": stats.mu, "sigma": stats.sigma}
        else:
            theirs = M.fid_statistics(fr[s.fid_layer])
        values["fid"] = M.fid_from_statistics(mine, theirs)
    if "sfid" in wanted:
        if "sfid" in provided:
            values["sfid"] = M.frechet_distance_to_statistics(fs[SPATIAL], stats.mu_s, stats.sigma_s)
        else:
            values["sfid"] = M.frechet_distance_features(fs[SPATIAL], fr[SPATIAL])
    if "isc" in wanted:
        values.update(M.inception_score(fs["logits_unbiased"], s))
    if "kid" in wanted:
        values.update(M.kernel_inception_distance(fs[POOL], fr[POOL], s))
    if "prc" in wanted:
        values.update(M.precision_recall(fs[POOL], fr[POOL], s))
    return values


def _stats_provide(stats: ReferenceStats | None, settings: MetricSettings) -> frozenset[str]:
    if stats is None:
        return frozenset()
    have = set()
    if stats.mu is not None and stats.sigma is not None:
        have.add("fid")  # ADM's are pool_3 (2048); another layer's must match its dimension
    if stats.mu_s is not None and stats.sigma_s is not None:
        have.add("sfid")
    return frozenset(have)


def _stored_inputs(samples: str, cfg: EvalConfig, vs_reference: set[str],
                   settings: MetricSettings):
    """(stored samples or None, stored reference or None, the reference's feature groups still
    to extract), every stored input checked; None where a model or the teacher is sampled."""
    sample_set = stored_samples(samples, cfg)
    ref = stored_reference(cfg.reference) if vs_reference else None
    provided = _stats_provide(ref[1] if ref else None, settings)
    need_r = M.groups_for(vs_reference, settings, samples=False, ref_stats=provided)
    if ref is not None and need_r and ref[0] is None:
        raise UserError(f"{cfg.reference}: {', '.join(sorted(vs_reference - provided))} "
                        "need reference images (arr_0), and this .npz holds only statistics")
    return sample_set, ref, need_r


def evaluate(
    samples: str,
    *,
    cfg: EvalConfig = EvalConfig(),
    metrics: Iterable[str] = ("fid",),
    bounds: Iterable[Bound | str] = (),
    teacher: str | None = None,
    ema: bool = True,
    reference_seed: int | None = None,
    settings: MetricSettings = MetricSettings(),
    use_cache: bool = True,
    progress: Progress | None = None,
    quiet: bool = True,
) -> EvalResult:
    """Score `samples` against `cfg.reference` (see the module docstring)."""
    start = time.perf_counter()
    bounds = [b if isinstance(b, Bound) else parse_bound(b) for b in bounds]
    wanted = requested_metrics(metrics, bounds)
    progress = progress or _no_progress
    device = resolve_device(cfg.device)
    check_samples(samples)  # a typo fails here, before anything is hashed, cached or sampled
    inception = wanted - M.NO_INCEPTION
    vs_reference = inception - {"isc"}  # the Inception Score needs no reference
    # Stored images and references are checked in full first, then the weights (offline without
    # them, fail before minutes of sampling), then the models are sampled.
    sample_set, ref, need_r = _stored_inputs(samples, cfg, vs_reference, settings)
    model = labels = None
    weights = resolve_weights(cfg.inception_weights or None, quiet=quiet, cache_dir=cache_dir(),
                              allow_unknown=cfg.allow_unknown_inception) if inception else None
    if sample_set is None:
        sample_set, model, labels = sample_model(
            samples, cfg=cfg, ema=ema, device=device, progress=progress,
            check_model=_check_consistency_model if "consistency" in wanted else None)
    values, extra = {}, {}
    if "consistency" in wanted:
        values["consistency"], extra = _consistency(sample_set, labels, model)
    if not inception:
        return EvalResult(values=values, samples=sample_set.describe() | extra,
                          reference={"kind": "none"}, extractor={"kind": "digits classifier"},
                          settings={"metrics": sorted(wanted)}, bounds=bounds,
                          seconds=time.perf_counter() - start)
    ref_seed = cfg.seed + REFERENCE_SEED_OFFSET if reference_seed is None else reference_seed
    ref_set, stats, ref_desc = ref if ref is not None else (None, None, {"kind": "none"})
    if vs_reference and ref is None:
        ref_set, stats, ref_desc = _teacher_reference(
            model, teacher, num=sample_set.num, cfg=cfg, seed=ref_seed, device=device,
            progress=progress, use_cache=use_cache)
    need_s = M.groups_for(inception, settings, samples=True)
    feats = _Features(weights, need_s | need_r, device=device, batch_size=cfg.batch_size,
                      progress=progress, use_cache=use_cache)
    fs = feats(sample_set, need_s, "features (samples)")
    fr = feats(ref_set, need_r, "features (reference)") if ref_set is not None else {}
    values.update(compute(inception, fs, fr, stats, settings))
    if ref_set is not None:
        ref_desc = ref_desc | {"num": ref_set.num, "sha256": ref_set.sha256}
    import torch_fidelity

    extractor = weights.describe() | {"torch_fidelity": torch_fidelity.__version__,
                                      "device": str(device)}
    used = settings.to_dict() | {"metrics": sorted(wanted)}
    if "kid" in wanted:
        used["kid_subset_size_used"] = min(settings.kid_subset_size, sample_set.num,
                                           ref_set.num if ref_set is not None else sample_set.num)
    return EvalResult(values=values, samples=sample_set.describe() | extra, reference=ref_desc,
                      extractor=extractor, settings=used, bounds=bounds,
                      seconds=time.perf_counter() - start)


def _check_consistency_model(model) -> None:
    """--consistency scores class-conditional 16x16x1 models with the ten digit classes."""
    from dkdm_cli.quality.digits import NUM_CLASSES

    if model.num_classes != NUM_CLASSES or tuple(model.sample_shape) != (1, 16, 16):
        raise UserError("--consistency uses the digits classifier: it scores class-conditional "
                        "16x16x1 models with ten classes (digits-cond and its students)")


def _consistency(sample_set: ImageSet, labels, model) -> tuple[float, dict[str, Any]]:
    """(overall class consistency, per-class figures) of class-conditional digits samples."""
    from dkdm_cli.quality.digits import class_consistency

    if labels is None or model is None:
        raise UserError("--consistency needs a class-conditional model sampled on the fly "
                        "(a run directory, export or teacher); it does not read stored images")
    _check_consistency_model(model)
    out = class_consistency(sample_set._array, labels)  # generated: always in memory
    return out["consistency"], {"consistency_per_class": out["per_class"]}


__all__ = ["Bound", "EvalResult", "MetricSettings", "evaluate", "parse_bound", "requested_metrics"]
