"""Precision and checkpoint-stall measurements behind issue 19's choices (CPU; one JSON line each).

  norm        GroupNorm under bf16 autocast: normalising a float32 copy (ADM's way, and dkdm's
              until issue 19) vs normalising in the activation dtype with float32 accumulation
              (dkdm's now): a unet-s student's forward/backward at 32x32x3, alternating rounds.
  teacher     a teacher forward in fp32 / bf16 / fp16 (digits teacher, b = 64), alternating.
  stall       what a checkpoint with a 64x64x3 pool costs the loop: the synchronous write it
              used to be vs the host snapshot that the loop pays now (the write runs beside it).

    python benchmarks/bench_precision.py norm --rounds 10
    python benchmarks/bench_precision.py stall --states 12800
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dkdm_cli.checkpoint import save_checkpoint
from dkdm_cli.distill.saver import CheckpointWriter
from dkdm_cli.models import _blocks, create_model
from dkdm_cli.teachers.spec import resolve_teacher


def _alternate(fns: dict, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: round(statistics.median(v), 5) for k, v in times.items()}


def _float32_copy_forward(self, x):
    # ADM's GroupNorm32: a float32 copy in, the input's dtype out (two full-size casts per call).
    with torch.autocast(x.device.type, enabled=False):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def bench_norm(args) -> dict:
    torch.manual_seed(0)
    model = create_model("unet-s", image_size=32, in_channels=3, learn_sigma=True, dropout=0.0)
    x, t = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 1000, (args.batch,))
    native = _blocks.GroupNorm32.forward

    def step(forward):
        def go():
            _blocks.GroupNorm32.forward = forward
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, t)
            out.float().square().mean().backward()
            _blocks.GroupNorm32.forward = native
        return go

    med = _alternate({"float32_copy": step(_float32_copy_forward), "activation_dtype": step(native)},
                     args.rounds)
    return {"bench": "norm", "model": "unet-s 32x32x3", "batch": args.batch, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "median_s": med,
            "activation_over_copy": round(med["activation_dtype"] / med["float32_copy"], 4)}


def bench_teacher(args) -> dict:
    x, t = torch.randn(args.batch, 1, 16, 16), torch.randint(0, 1000, (args.batch,))
    teachers = {name: resolve_teacher("digits").to("cpu", dtype=dtype) for name, dtype in
                (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    med = _alternate({k: (lambda m=m: m.model_output(x, t)) for k, m in teachers.items()}, args.rounds)
    return {"bench": "teacher", "teacher": "digits", "batch": args.batch, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "median_s": med}


def bench_stall(args) -> dict:
    """Seconds the loop loses per checkpoint: the synchronous write it used to be, vs now the
    host snapshot plus whatever the background write takes from a loop running beside it (the
    loop here: matrix products standing in for iterations, timed with and without the write)."""
    pool = {"pool/x": torch.randn(args.states, 3, 64, 64), "pool/t": torch.zeros(args.states,
                                                                                 dtype=torch.long)}
    weights = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # ~32 MB of "student"
    tensors = {**pool, **weights}
    gib = sum(v.numel() * v.element_size() for v in tensors.values()) / 2**30
    a = torch.randn(384, 384)

    def work(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            a @ a
        return time.perf_counter() - start

    unit = work(200) / 200
    out = {"bench": "stall", "states": args.states, "gib": round(gib, 3)}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sync, lost = [], []
        for i in range(args.rounds):
            start = time.perf_counter()
            save_checkpoint(Path(tmp) / f"sync-{i}.safetensors", tensors, {"step": 0})
            sync.append(time.perf_counter() - start)
            writer = CheckpointWriter()
            start = time.perf_counter()
            writer.submit(Path(tmp) / f"bg-{i}.safetensors", tensors, {"step": 0})
            units = 0
            while writer._thread is not None and writer._thread.is_alive():  # the loop goes on
                work(10)
                units += 10
            writer.wait()
            elapsed = time.perf_counter() - start
            lost.append(elapsed - units * unit)  # wall time not spent on loop work
            for f in Path(tmp).iterdir():
                f.unlink()
    out.update(sync_write_s=round(statistics.median(sync), 3),
               loop_time_lost_now_s=round(statistics.median(lost), 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=("norm", "teacher", "stall"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--states", type=int, default=12800, help="stall: pool states (64x64x3)")
    parser.add_argument("--dir", default=None, help="stall: where to write (default: the temp dir)")
    args = parser.parse_args()
    fn = {"norm": bench_norm, "teacher": bench_teacher, "stall": bench_stall}[args.bench]
    print(json.dumps(fn(args)), flush=True)


if __name__ == "__main__":
    main()
