"""How digit-like a model's samples are: the digits quality measure of `--num` samples beside
the same figures for real digits. Prints one JSON object on stdout, progress on stderr.

The model is anything `dkdm sample` takes: a teacher spec (`digits`), a model file or a run
directory (a distilled student). It must make 16x16x1 images. The measure is defined in
dkdm_cli/quality/digits.py (a seeded CNN trained on 1,000 real digits; the other 797 are the
reference); see docs/teachers/digits.md for the figures of the shipped teacher.

Example (the model card's figures):
    python benchmarks/digits_quality.py --model digits --num 1000 --steps 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dkdm_cli import __version__
from dkdm_cli.errors import DkdmError
from dkdm_cli.quality import digits as quality
from dkdm_cli.sample import generate
from dkdm_cli.teachers.spec import resolve_teacher


def measurement_settings() -> dict:
    """How the measure is defined, written next to every result."""
    return {
        "classifier": "conv3x3(1->8)-pool-conv3x3(8->16)-pool-linear(256->64)-linear(64->10), ReLU",
        "classifier_train": f"{quality.TRAIN_SIZE} real digits (split seed {quality.SPLIT_SEED}), "
                            f"{quality.CLASSIFIER_EPOCHS} epochs, seed {quality.CLASSIFIER_SEED}, "
                            "plus as many non-digits with a uniform target",
        "reference": f"{quality.NUM_DIGITS - quality.TRAIN_SIZE} held-out real digits",
        "confident_threshold": quality.CONFIDENT_THRESHOLD,
        "features": f"{quality.FEATURE_DIM}-d penultimate layer",
    }


def main(argv: list[str] | None = None) -> int:
    """Sample, measure, print JSON; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits", help="teacher spec, model file or run directory")
    ap.add_argument("--num", type=int, default=1000, help="samples to draw and measure")
    ap.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    ap.add_argument("--sampler", default="iddpm", choices=("iddpm", "ddim"))
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (and real-subset seed)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward (as dkdm sample)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    try:
        model = resolve_teacher(args.model, device=args.device)
        if tuple(model.sample_shape) != (1, quality.IMAGE_SIZE, quality.IMAGE_SIZE) \
                and model.autoencoder is None:
            print(f"error: {args.model} makes {model.sample_shape} images; the digits measure "
                  "needs 16x16x1", file=sys.stderr)
            return 2
        print(f"sampling {args.num} images from {args.model} ...", file=sys.stderr)
        start = time.perf_counter()
        images = generate(model, num=args.num, steps=args.steps, sampler=args.sampler, eta=args.eta,
                          seed=args.seed, batch_size=args.batch_size, device=args.device)
        sample_seconds = time.perf_counter() - start  # images: (N, 16, 16, 1) uint8
        start = time.perf_counter()
        measured = quality.measure_digits(images)
        nearest = quality.nearest_real_distance(images)
        reference = quality.reference_figures(args.num, seed=args.seed)
        measure_seconds = time.perf_counter() - start
    except DkdmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    result = {
        "model": args.model, "parameters": model.num_parameters, "num": args.num,
        "sampler": args.sampler, "steps": args.steps, "eta": args.eta, "seed": args.seed,
        "batch_size": args.batch_size, "device": args.device,
        "samples": measured.to_dict(), "real": reference,
        "nearest_real_rms": nearest, "measure": measurement_settings(),
        "sample_seconds": round(sample_seconds, 1),
        "measure_seconds": round(measure_seconds, 1),  # includes training the classifier
        "dkdm": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
