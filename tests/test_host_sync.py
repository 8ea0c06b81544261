"""An iteration makes no host-device sync, proven without a GPU.

Every op the loop dispatches is watched by a TorchDispatchMode for what would stall a GPU or
copy from the host on it: scalar reads (`.item()`, `bool(tensor)`, `int(tensor)`), tensors made
from Python data (`torch.tensor([...])`), float64 tensors (the schedule's canonical tables are
float64 on the CPU: reading one means a cast and a copy per iteration), any read of those CPU
tables or of the CPU timestep map, and copies between devices. Between log boundaries every
count must be zero; the same ops run on a GPU, so there they cannot sync either.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dkdm_cli.config import load_config
from dkdm_cli.diffusion.gaussian import COEF_NAMES
from dkdm_cli.distill.distributed import DistInfo
from dkdm_cli.distill.engine import Distiller
from dkdm_cli.distill.observe import MetricWindow, Observer
from dkdm_cli.teachers.spec import resolve_teacher

aten = torch.ops.aten
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default}
FROM_PYTHON = {aten.lift_fresh.default, aten.lift_fresh_copy.default}


class HostSyncCounter(TorchDispatchMode):
    """Counts, per kind, the ops that would sync with or copy from the host on a GPU."""

    def __init__(self, forbidden_storages: set[int]) -> None:
        super().__init__()
        self.forbidden = forbidden_storages
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.seen: set[str] = set()  # every op's name, to show the watch covers the backward too

    def _hit(self, kind: str, func) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, str(func))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen.add(func.__name__)
        if func in SCALAR_READS:
            self._hit("scalar read", func)
        if func in FROM_PYTHON:
            self._hit("tensor from Python data", func)
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        out = func(*args, **kwargs)
        outputs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        tensors = inputs + outputs
        if any(t.dtype is torch.float64 for t in tensors):
            self._hit("float64 tensor", func)
        if any(t.untyped_storage().data_ptr() in self.forbidden for t in inputs if t.numel()):
            self._hit("read of a CPU schedule table", func)
        if len({t.device for t in tensors}) > 1:
            self._hit("cross-device copy", func)
        return out


def _canonical_tables(diffusion) -> set[int]:
    names = set(COEF_NAMES) | {"betas", "posterior_variance", "large_variance", "timestep_map"}
    return {getattr(diffusion, n).untyped_storage().data_ptr() for n in names}


def _distiller(teacher_file: Path, tmp_path: Path, *, sets: list[str]) -> Distiller:
    cfg = load_config(None, search_cwd=False, sets=[
        f'teacher.name="{teacher_file}"', 'student.name="unet-t"',
        "student.kwargs={model_channels=8, channel_mult=[1, 2], num_res_blocks=1}",
        "distill.batch_size=4", "distill.rho=0.5", "distill.init_steps=2", 'distill.device="cpu"',
        *sets])
    teacher = resolve_teacher(str(teacher_file))
    obs = Observer(tmp_path, is_main=True, quiet=True, json_out=False, tensorboard=False)
    run = Distiller(cfg, info=DistInfo(), run_dir=tmp_path, teacher=teacher, observer=obs)
    run.prepare_source(None)
    return run


def _count(run: Distiller, iterations: int) -> HostSyncCounter:
    window = MetricWindow(run.device, run.diffusion.num_timesteps)
    for _ in range(2):  # first use builds the device tables: once per run, not per iteration
        run.iteration(window)
    counter = HostSyncCounter(_canonical_tables(run.diffusion))
    with counter:
        for _ in range(iterations):
            run.iteration(window)
    return counter


@pytest.mark.parametrize("case", ["unconditional", "conditional-guided", "fixed-variance",
                                  "consistency", "consistency-guided"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_iterations_make_no_host_sync(case, precision, tiny_teacher_file, tiny_cond_teacher_file,
                                      tiny_fixed_teacher_file, tmp_path):
    teacher = {"unconditional": tiny_teacher_file, "conditional-guided": tiny_cond_teacher_file,
               "fixed-variance": tiny_fixed_teacher_file, "consistency": tiny_teacher_file,
               "consistency-guided": tiny_cond_teacher_file}[case]
    sets = [f'distill.precision="{precision}"', f'distill.teacher_precision="{precision}"']
    if case.endswith("guided"):
        sets += ["distill.guidance_scale=2.0", "distill.class_weights=[1, 2, 3]"]
    if case.startswith("consistency"):  # the few-step objective and its target network
        sets += ['distill.objective="consistency"', "distill.consistency_k=3"]
    run = _distiller(teacher, tmp_path, sets=sets)
    counter = _count(run, iterations=3)
    assert not counter.counts, (dict(counter.counts), counter.examples)
    assert run.state.step == 5
    # The watch saw the whole iteration: teacher and student forwards, backward, optimizer.
    assert {"convolution.default", "convolution_backward.default", "_fused_adamw_.default",
            "_foreach_lerp_.Scalar"} <= counter.seen


def test_the_counter_sees_what_it_must_refuse(tiny_teacher_file, tmp_path):
    """The detector is not vacuous: each kind of sync it refuses is counted when it happens."""
    run = _distiller(tiny_teacher_file, tmp_path, sets=[])
    counter = HostSyncCounter(_canonical_tables(run.diffusion))
    t = run.source.pool.t[:4]
    with counter:
        _ = run.source.pool.x.sum().item()  # a scalar read
        torch.tensor([1.0, 2.0])  # a tensor from Python data
        run.diffusion.alphas_cumprod.float()[t]  # the old _extract: a float64 CPU table cast
        run.diffusion.timestep_map[t]  # the CPU timestep map
    assert {"scalar read", "tensor from Python data", "float64 tensor",
            "read of a CPU schedule table"} <= set(counter.counts)
