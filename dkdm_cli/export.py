"""Shipping a student: a dkdm model file (safetensors) or ONNX, plus a model card.

safetensors  the project's model format (models/io.py) with the diffusion settings, the sample
             shape, the teacher it was distilled from and `autoencoder_from`, so the file works
             as a teacher (`resolve_teacher(path)`) and as a student (`api.load_student(path)`).
onnx         the denoiser alone: inputs x float32 (B, C, H, W) and t float32 (B,) (the network's
             own timestep input), output (B, C or 2C, H, W); batch size dynamic. Checked with
             onnxruntime against PyTorch before it is moved into place: a max abs difference
             above ONNX_TOLERANCE is an error and leaves nothing behind.
diffusers    a folder that `DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)` loads
             without dkdm: the student, a scheduler with its noise process and sampler, the
             pipeline, and for latent students the teacher's autoencoder (diffusers_export/).
             dkdm reads it back as a teacher or a model (`--teacher DIR`, `--model DIR`).
A README.md model card is written beside the file (inside the folder for diffusers):
configuration, step, weights (EMA or raw), the teacher and its license where known, and the
run's latest metrics (the last line of metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkdm_cli import __version__, _console, _fs
from dkdm_cli.checkpoint import Checkpoint, load_latest, refuse_run_internals, student_from_checkpoint
from dkdm_cli.errors import CheckpointError, ExportCheckError, UserError
from dkdm_cli.models import count_parameters

FORMATS = ("safetensors", "onnx", "diffusers")
FOLDER_FORMATS = ("diffusers",)  # written as a folder, not a file
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 18
CARD_MARKER = "<!-- written by dkdm export -->"


@dataclass
class ExportResult:
    """What was written, and how it checked out."""

    path: str
    format: str
    step: int
    ema: bool
    parameters: int
    architecture: str = ""
    card: str = ""
    exporter: str = ""
    max_abs_diff: float | None = None
    checked_batches: list[int] = field(default_factory=list)
    num_classes: int = 0  # a class-conditional student's classes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def default_out(run_dir: Path, fmt: str) -> Path:
    """<run_dir>/export/<run name>.<format> (a folder <run name>-diffusers for diffusers)."""
    name = Path(run_dir).resolve().name
    return Path(run_dir) / "export" / (f"{name}-{fmt}" if fmt in FOLDER_FORMATS else f"{name}.{fmt}")


def check_out(out: Path, fmt: str) -> None:
    """Refuse an --out the format cannot be written to, before any work."""
    if fmt not in FOLDER_FORMATS:
        if out.suffix != f".{fmt}":
            raise UserError(f"--out {out}: a {fmt} export must end in .{fmt}")
        _fs.check_target(out, flag="--out", folder=False)
    else:
        from dkdm_cli.diffusers_export.layout import is_export_folder

        _fs.check_target(out, flag="--out", folder=True)
        if out.is_dir() and any(out.iterdir()) and not is_export_folder(out):
            raise UserError(f"--out {out}: a folder that is not a dkdm diffusers export; choose a "
                            "new or empty folder (an earlier export there is replaced)")
    refuse_run_internals(out, flag="--out")


def export_doc(ckpt: Checkpoint, run_dir: Path, *, ema: bool) -> dict[str, Any]:
    """The metadata an export carries (beside the ModelSpec save_model adds)."""
    doc = ckpt.doc
    missing = [k for k in ("model", "diffusion", "sample_shape", "teacher") if k not in doc]
    if missing:
        raise CheckpointError(f"{ckpt.path}: checkpoint lacks {', '.join(missing)}")
    extra = {
        "diffusion": doc["diffusion"],
        "sample_shape": list(doc["sample_shape"]),
        # A dict, as Teacher.info: the spec of the teacher this student was distilled from.
        "teacher": {"spec": doc["teacher"], **_guidance(doc)},
        "distillation": {"run": Path(run_dir).resolve().name, "step": ckpt.step, "ema": ema,
                         "checkpoint": ckpt.path.name, "config": doc.get("config")},
    }
    if doc.get("autoencoder_from"):
        extra["autoencoder_from"] = doc["autoencoder_from"]
    if doc.get("sampler"):  # a few-step student samples with its own sampler
        extra["sampler"] = doc["sampler"]
    return extra


def _guidance(doc: dict[str, Any]) -> dict[str, float]:
    """{"guidance_scale": s} for a student distilled on guided targets (s != 1), else {}."""
    scale = float(((doc.get("config") or {}).get("distill") or {}).get("guidance_scale", 1.0))
    return {"guidance_scale": scale} if scale != 1.0 else {}


def latest_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last record of the run's metrics.jsonl, if any."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if ln.strip()]
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(record, dict):
            return record
    return None


def export_student(run_dir: Path, *, fmt: str = "safetensors", out: Path | None = None,
                   ema: bool = True) -> ExportResult:
    """Export the newest checkpoint of `run_dir` (EMA weights unless ema=False)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir}: no such folder")
    out = Path(out) if out is not None else default_out(run_dir, fmt)
    check_out(out, fmt)
    ckpt = load_latest(run_dir, warn=_console.warn)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: the run has no checkpoint yet")
    extra = export_doc(ckpt, run_dir, ema=ema)
    model = student_from_checkpoint(ckpt, ema=ema).eval()
    result = ExportResult(path=str(out), format=fmt, step=ckpt.step, ema=ema,
                          parameters=count_parameters(model), architecture=model.spec.name,
                          num_classes=int(getattr(model, "num_classes", 0) or 0))
    if fmt == "safetensors":
        from dkdm_cli.models.io import read_model_doc, save_model

        save_model(model, out, extra=extra)  # atomic
        read_model_doc(out)  # readable back, or ModelFileError now rather than at load time
        result.exporter = "dkdm model file"
    elif fmt == "diffusers":
        from dkdm_cli.diffusers_export.folder import export_folder

        result.exporter = "diffusers pipeline (DKDMPipeline, trust_remote_code)"
        export_folder(model, out, extra=extra, result=result,
                      card=lambda folder: model_card(out, run_dir, extra, result))
        result.card = str(out / "README.md")
        return result
    else:
        export_onnx(model, out, extra=extra, result=result)
    result.card = str(write_model_card(out, run_dir, extra, result))
    return result


# -- ONNX -----------------------------------------------------------------------------------------

def _need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise UserError("ONNX export needs onnx, onnxscript and onnxruntime: "
                        "pip install 'dkdm[onnx]'") from exc
    return onnx, onnxruntime


def _example(shape: tuple[int, int, int], batch: int, num_timesteps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *shape), generator=gen)  # (B, C, H, W)
    t = torch.rand(batch, generator=gen) * (num_timesteps - 1)  # (B,)
    return x, t


def _export_once(model: nn.Module, args, path: Path, *, dynamo: bool) -> None:
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(model, args, str(path), input_names=["x", "t"], output_names=["output"],
                          dynamo=True, dynamic_shapes={"x": {0: batch}, "t": {0: batch}},
                          opset_version=ONNX_OPSET, external_data=False)
    else:
        torch.onnx.export(model, args, str(path), input_names=["x", "t"], output_names=["output"],
                          dynamo=False, opset_version=ONNX_OPSET,
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "output": {0: "batch"}})


def _torch_export(model: nn.Module, args, path: Path) -> str:
    """torch.onnx.export with the dynamo exporter, else the TorchScript one; returns which.
    Their chatter is kept away from stdout (it would corrupt --json)."""
    errors = []
    for dynamo in (True, False):
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                    warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                _export_once(model, args, path, dynamo=dynamo)
            return "torch.onnx (dynamo)" if dynamo else "torch.onnx (torchscript)"
        except Exception as exc:  # noqa: BLE001  third-party exporters raise anything
            errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {exc}")
    raise ExportCheckError("ONNX export failed:\n" + "\n".join(errors))


def check_onnx(path: Path, model: nn.Module, *, shape: tuple[int, int, int],
               num_timesteps: int, batches: tuple[int, ...] = (2, 3)) -> float:
    """Max abs difference between onnxruntime and PyTorch on random inputs (several batch
    sizes, so the dynamic batch axis is exercised)."""
    _onnx, ort = _need_onnx()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, batch in enumerate(batches):
        x, t = _example(shape, batch, num_timesteps, seed=i)
        with torch.no_grad():
            expected = model(x, t).numpy()  # (B, C_out, H, W)
        got = session.run(["output"], {"x": x.numpy(), "t": t.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportCheckError(f"ONNX output shape {got.shape} != PyTorch's {expected.shape}")
        worst = max(worst, float(abs(got - expected).max()))
    return worst


def export_onnx(model: nn.Module, out: Path, *, extra: dict[str, Any], result: ExportResult) -> None:
    """Export, check against PyTorch, attach the metadata, then move into place."""
    if getattr(model, "num_classes", 0):
        raise UserError("ONNX export of class-conditional models is not supported yet (the graph "
                        "takes x and t only); export --format safetensors")
    onnx, _ort = _need_onnx()
    model = model.float().cpu().eval()
    shape = tuple(int(s) for s in extra["sample_shape"])
    num_timesteps = int(extra["diffusion"].get("num_timesteps", 1000))
    with _fs.atomic_path(out) as tmp:
        result.exporter = _torch_export(model, _example(shape, 2, num_timesteps, seed=0), tmp)
        proto = onnx.load(str(tmp))
        doc = {"format": "dkdm-onnx", "dkdm_version": __version__,
               "model": model.spec.to_dict(), **extra}
        entry = proto.metadata_props.add()
        entry.key, entry.value = "dkdm", json.dumps(doc)
        onnx.save(proto, str(tmp))
        result.checked_batches = [2, 3]
        diff = check_onnx(tmp, model, shape=shape, num_timesteps=num_timesteps,
                          batches=tuple(result.checked_batches))
        result.max_abs_diff = diff
        if not diff <= ONNX_TOLERANCE:
            raise ExportCheckError(
                f"the ONNX model differs from PyTorch by up to {diff:.3g} (> {ONNX_TOLERANCE:g}); "
                "nothing was written. Try the safetensors format, or report the architecture")


# -- model card ----------------------------------------------------------------------------------

def _config_text(config: dict[str, Any] | None) -> str:
    if not config:
        return "(not recorded)"
    try:
        import tomli_w

        return tomli_w.dumps(config).strip()
    except (TypeError, ValueError):
        return json.dumps(config, indent=1)


def teacher_license(spec: str) -> str:
    """What is known of the license of the teacher a student comes from (following a chain of
    students back to the first teacher), for the model card."""
    from dkdm_cli.teachers.registry import TEACHERS

    origin = original_teacher(spec)
    if origin in TEACHERS:
        entry = TEACHERS.create(origin)
        if entry.license:
            return (f"`{entry.license}`, as published with `{entry.source}`. The student is "
                    "derived from the teacher's weights: respect the teacher's license")
        return f"not recorded by dkdm: check the license published with `{entry.source}`"
    return f"unknown to dkdm: check the teacher's own license (`{origin}`)"


def original_teacher(spec: str, *, hops: int = 8) -> str:
    """The first teacher of a chain (a student of a student ...): run directories, dkdm model
    files and exports record the spec they were distilled from."""
    from dkdm_cli.errors import DkdmError
    from dkdm_cli.teachers.spec import classify, recorded_parent

    for _ in range(hops):
        try:
            parent = recorded_parent(spec, kind=classify(spec))
        except DkdmError:
            return spec
        if not parent:
            return spec
        spec = parent
    return spec


def _rows(extra: dict[str, Any], result: ExportResult, out: Path) -> list[tuple[str, str]]:
    diff, shape = extra["diffusion"], extra["sample_shape"]
    teacher = extra["teacher"]["spec"]
    rows = [
        ("file", f"`{out.name}` ({result.format}, {result.exporter})"),
        ("architecture", f"`{result.architecture}`"),
        ("parameters", f"{result.parameters:,}"),
        ("teacher", f"`{teacher}`"),
        ("teacher license", teacher_license(teacher)),
        ("step", str(result.step)),
        ("weights", "EMA" if result.ema else "raw (not EMA)"),
        ("sample shape (C, H, W)", " x ".join(str(s) for s in shape)),
        ("diffusion", f"{diff.get('schedule')} schedule, T = {diff.get('num_timesteps')}, "
                      f"{diff.get('prediction')} prediction, {diff.get('variance')} variance, "
                      f"x0 {'clipped to [-1, 1]' if diff.get('clip_denoised') else 'not clipped'}, "
                      f"timestep scale {diff.get('timestep_scale', 1.0)}"),
    ]
    if extra.get("autoencoder_from"):
        rows.append(("autoencoder", f"decode samples with `{extra['autoencoder_from']}`'s"))
    if result.max_abs_diff is not None:
        what = "ONNX" if result.format == "onnx" else "diffusers load"
        rows.append((f"{what} check", f"max abs difference to PyTorch {result.max_abs_diff:.2e}"
                     + (f" (batches {result.checked_batches}, tolerance {ONNX_TOLERANCE:g})"
                        if result.format == "onnx" else "")))
    return rows


def _use(out: Path, result: ExportResult, extra: dict[str, Any]) -> str:
    if result.format == "safetensors":
        return (f"```\ndkdm sample --model {out.name} --num 64 --out samples --grid grid.png\n"
                f"dkdm eval {out.name} --fid --num 1000\n```")
    if result.format == "onnx":
        return ("```\n# inputs: x float32 (B, C, H, W); t float32 (B,) = process step x timestep "
                f"scale\nimport onnxruntime; s = onnxruntime.InferenceSession('{out.name}')\n"
                "out = s.run(['output'], {'x': x, 't': t})[0]  # (B, C or 2C, H, W)\n```")
    from dkdm_cli.diffusers_export.card import diffusers_use

    return diffusers_use(out, extra, num_classes=result.num_classes)


def model_card(out: Path, run_dir: Path, extra: dict[str, Any], result: ExportResult) -> str:
    """The README.md text for an export."""
    dist = extra["distillation"]
    metrics = latest_metrics(run_dir)
    table = "\n".join(f"| {k} | {v} |" for k, v in _rows(extra, result, out))
    metric_text = (f"```json\n{json.dumps(metrics, indent=1)}\n```" if metrics else
                   "No metrics.jsonl in the run directory.")
    front = ""
    if result.format == "diffusers":
        from dkdm_cli.diffusers_export.card import front_matter

        front = front_matter(original_teacher(extra["teacher"]["spec"]),
                             num_classes=result.num_classes)
    return (f"{front}{CARD_MARKER}\n# {dist['run']}: a DKDM student\n\n"
            f"Distilled from `{extra['teacher']['spec']}` without its training data (data-free "
            f"knowledge distillation, DKDM, CVPR 2025) by dkdm {__version__}.\n\n"
            f"| | |\n|---|---|\n{table}\n\n## Use\n\n{_use(out, result, extra)}\n\n"
            f"## Latest metrics (last line of metrics.jsonl)\n\n{metric_text}\n\n"
            "Scores against the teacher: `dkdm eval MODEL --fid --num 1000` (MODEL: this export).\n\n"
            f"## Configuration\n\n```toml\n{_config_text(dist.get('config'))}\n```\n")


def write_model_card(out: Path, run_dir: Path, extra: dict[str, Any], result: ExportResult) -> Path:
    """README.md beside the export; a README.md that dkdm did not write is left alone (the card
    then goes to <name>.README.md)."""
    card = out.parent / "README.md"
    if card.is_file() and not card.read_text(errors="replace").startswith(CARD_MARKER):
        card = out.parent / f"{out.stem}.README.md"
        _console.warn(f"{out.parent / 'README.md'} exists and is not a dkdm model card; "
                      f"writing {card.name} instead")
    _fs.write_text(card, model_card(out, run_dir, extra, result))
    return card
