"""What `dkdm eval` adds on top of torch-fidelity: the same FID + IS + KID on the same inputs,
timed in alternating rounds in one process (this machine's speed drifts by up to a third).

Inputs: --num "samples" in an .npz (arr_0) and --num "reference" images in a PNG folder,
both --size x --size RGB. dkdm: `evaluate(npz, reference=folder)` with its caches off.
torch-fidelity: `calculate_metrics(input1=<the .npz's images as a Dataset>, input2=<folder>)`
with its cache off and otherwise default settings (DataLoader workers included). The values
are checked equal. Goal: dkdm at most 5% slower. Reported: wall time (median, best, and the
median of per-round ratios) and CPU time including child processes (steadier on a shared
box). Without --inception-weights, torch-fidelity's architecture with random weights is used
(same cost; the numbers mean nothing).
Prints one JSON line on stdout.

Example:
    python benchmarks/bench_eval.py --num 100 --size 16 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (torch-fidelity's DataLoader workers):
    less disturbed than wall time when other jobs share the machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def blobs(n: int, size: int, seed: int) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth random images."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_weights(path: Path) -> Path:
    """torch-fidelity's Inception with random Kaiming weights (as tests/conftest.py makes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_inception_weights

    return make_inception_weights(path)


class NpzImages(torch.utils.data.Dataset):
    """arr_0 of an .npz as (3, H, W) uint8 tensors: what torch-fidelity needs for an .npz."""

    def __init__(self, path: Path) -> None:
        with np.load(path, allow_pickle=False) as f:
            self.images = f["arr_0"]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--inception-weights", type=Path, default=None)
    ap.add_argument("--no-workers", action="store_true",
                    help="torch-fidelity with save_cpu_ram=True: no DataLoader worker processes, "
                    "so both read images in-process (the strictest comparison)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DKDM_OFFLINE"] = "1"
    from torch_fidelity import calculate_metrics

    from dkdm_cli.config import EvalConfig
    from dkdm_cli.evaluate import evaluate
    from dkdm_cli.sample import save_npz, save_png_folder

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    weights = args.inception_weights or random_weights(tmp / "weights-inception-random.pth")
    save_npz(blobs(args.num, args.size, 1), tmp / "samples.npz")
    save_png_folder(blobs(args.num, args.size, 2), tmp / "reference")
    cfg = EvalConfig(reference=str(tmp / "reference"), inception_weights=str(weights),
                     batch_size=args.batch, device="cpu")

    def run_dkdm() -> dict:
        res = evaluate(str(tmp / "samples.npz"), cfg=cfg, metrics={"fid", "isc", "kid"},
                       use_cache=False)
        return {"fid": res.values["fid"], "isc": res.values["isc"], "kid": res.values["kid"]}

    def run_fidelity() -> dict:
        res = calculate_metrics(
            input1=NpzImages(tmp / "samples.npz"), input2=str(tmp / "reference"), cuda=False,
            batch_size=args.batch, fid=True, isc=True, kid=True,
            kid_subset_size=min(1000, args.num), feature_extractor_weights_path=str(weights),
            cache=False, verbose=False, save_cpu_ram=args.no_workers)
        return {"fid": res["frechet_inception_distance"], "isc": res["inception_score_mean"],
                "kid": res["kernel_inception_distance_mean"]}

    times: dict[str, list[float]] = {"dkdm": [], "torch_fidelity": []}
    cpu: dict[str, list[float]] = {"dkdm": [], "torch_fidelity": []}
    values: dict[str, dict] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (imports, allocator), not timed
        order = (("dkdm", run_dkdm), ("torch_fidelity", run_fidelity))
        for key, fn in order if round_ % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), cpu_seconds()
            values[key] = fn()
            if round_:
                times[key].append(time.perf_counter() - start)
                cpu[key].append(cpu_seconds() - start_cpu)
        print(f"round {round_}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v),
              file=sys.stderr)
    same = all(abs(values["dkdm"][k] - values["torch_fidelity"][k]) <= 1e-6 * max(1.0, abs(v))
               for k, v in values["torch_fidelity"].items())
    ours, theirs = statistics.median(times["dkdm"]), statistics.median(times["torch_fidelity"])
    # Each round's pair ran back to back: the median of per-round ratios resists drift best.
    paired = statistics.median(a / b - 1 for a, b in zip(times["dkdm"], times["torch_fidelity"],
                                                          strict=True))
    print(json.dumps({
        "num": args.num, "size": args.size, "rounds": args.rounds, "batch": args.batch,
        "metrics": ["fid", "isc", "kid"], "dkdm_s": round(ours, 3),
        "torch_fidelity_s": round(theirs, 3), "overhead_of_medians": round(ours / theirs - 1, 4),
        "overhead_paired_median": round(paired, 4),
        "overhead_of_best": round(min(times["dkdm"]) / min(times["torch_fidelity"]) - 1, 4),
        "cpu_dkdm_s": round(statistics.median(cpu["dkdm"]), 3),
        "cpu_torch_fidelity_s": round(statistics.median(cpu["torch_fidelity"]), 3),
        "cpu_overhead_paired_median": round(statistics.median(
            a / b - 1 for a, b in zip(cpu["dkdm"], cpu["torch_fidelity"], strict=True)), 4),
        "all_dkdm_s": [round(s, 3) for s in times["dkdm"]],
        "all_torch_fidelity_s": [round(s, 3) for s in times["torch_fidelity"]],
        "values_equal": same, "values": values, "threads": torch.get_num_threads(),
        "random_weights": args.inception_weights is None, "fidelity_workers": not args.no_workers,
        "torch": torch.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
