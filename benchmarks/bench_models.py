"""Throughput of the CPU-sized model presets: forward and forward+backward images per second.

Forward is the teacher's use (eval mode, inference_mode); forward+backward is the student's (train
mode, MSE against a fixed random target, no optimiser step). Each measurement is the median of
`--repeats` timed rounds after one warm-up round; the two passes alternate round by round so that
a machine whose speed drifts slows both alike. Prints one JSON line on stdout, progress on stderr.

Example:
    python benchmarks/bench_models.py --batch 8 --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from dkdm_cli import __version__
from dkdm_cli.models import count_parameters, create_model
from dkdm_cli.models.summary import summarize

# (name, image size, channels): the built-in digits teacher's shape and CIFAR-10's.
DEFAULT_CASES = ("unet-t:16:1", "unet-t:32:3", "dit-t/2:32:3", "unet-s:32:3", "dit-s/2:32:3")


def parse_case(text: str) -> tuple[str, int, int]:
    """'name:size:channels' -> (name, size, channels)."""
    try:
        name, size, channels = text.rsplit(":", 2)
        return name, int(size), int(channels)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name:size:channels, got {text!r}") from None


def time_rounds(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, *, repeats: int) -> dict:
    """Median seconds of a forward and of a forward+backward, measured in alternating rounds."""
    target = torch.randn_like(model(x, t)).detach()  # (B, C_out, H, W)

    def forward() -> None:
        model.eval()
        with torch.inference_mode():
            model(x, t)

    def forward_backward() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        (model(x, t) - target).square().mean().backward()

    seconds: dict[str, list[float]] = {"fwd": [], "fwd_bwd": []}
    for round_ in range(repeats + 1):  # round 0 warms up allocator and kernels, not timed
        for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
            start = time.perf_counter()
            fn()
            if round_:
                seconds[key].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in seconds.items()}


def bench_case(name: str, size: int, channels: int, *, batch: int, repeats: int) -> dict:
    """One result row for preset `name` on (batch, channels, size, size) inputs."""
    torch.manual_seed(0)
    model = create_model(name, image_size=size, in_channels=channels, learn_sigma=True)
    x = torch.randn(batch, channels, size, size)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,))  # (B,)
    median = time_rounds(model, x, t, repeats=repeats)
    row = {
        "model": name, "image": f"{size}x{size}x{channels}", "params": count_parameters(model),
        "gflops_per_image": round(summarize(name, image_size=size, channels=channels).gflops, 3),
        "fwd_img_s": round(batch / median["fwd"], 1),
        "fwd_bwd_img_s": round(batch / median["fwd_bwd"], 1),
        "fwd_ms": round(1000 * median["fwd"], 1), "fwd_bwd_ms": round(1000 * median["fwd_bwd"], 1),
    }
    print(f"{name:>8} {row['image']:>8}: fwd {row['fwd_img_s']:8.1f} img/s, "
          f"fwd+bwd {row['fwd_bwd_img_s']:8.1f} img/s", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every case, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", type=parse_case, default=[parse_case(c) for c in DEFAULT_CASES],
                        help="name:size:channels entries (learned variance)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (on a shared machine 1 can beat 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench_case(n, s, c, batch=args.batch, repeats=args.repeats) for n, s, c in args.cases]
    print(json.dumps({
        "bench": "models", "dkdm": __version__, "torch": torch.__version__, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "batch": args.batch, "repeats": args.repeats, "statistic": "median", "results": rows,
    }))


if __name__ == "__main__":
    main()
