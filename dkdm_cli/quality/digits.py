"""How digit-like a batch of 16x16 grey images is: the quality measure of the `digits` teacher.

A small CNN is trained (seeded, a few seconds on a CPU) on 1,000 of scikit-learn's 1,797 real
handwritten digits, preprocessed exactly as the teacher's training data (0..16 -> [-1, 1],
bilinear to 16x16). The other 797 (the held-out split) are the reference. For a batch of images:

  confident  fraction whose top class has softmax probability >= CONFIDENT_THRESHOLD (0.9)
  balance    entropy of the predicted-class histogram / log(10): 1.0 = all ten equally often
  frechet    Frechet distance between the classifier's penultimate features (64-d) of the batch
             and of the 797 held-out real digits (the FID recipe with a digit classifier)
  counts     how many images fall in each predicted class (argmax, confident or not) 0..9

Besides the digits the classifier is shown as many non-digits (Gaussian and uniform noise, flat
grey, pixel-shuffled digits) with a uniform target, so blank or noisy images are not called digits
with confidence.
`reference_figures(num)` gives the same figures for real digits. Usage:

    from dkdm_cli.quality.digits import measure_digits, reference_figures
    measure_digits(images).to_dict()  # uint8 (N, 16, 16, 1) or float (N, 1, 16, 16) in [-1, 1]

scikit-learn (for its bundled digits) is imported lazily: `pip install scikit-learn`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dkdm_cli.errors import ShapeMismatchError, UserError

IMAGE_SIZE = 16
NUM_CLASSES = 10
NUM_DIGITS = 1797
TRAIN_SIZE = 1000  # classifier training split; the remaining 797 are held out
SPLIT_SEED = 0
CLASSIFIER_SEED = 0
CLASSIFIER_EPOCHS = 30
CONFIDENT_THRESHOLD = 0.9
FEATURE_DIM = 64


# -- the data ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise UserError(
            "the digits data and quality measure need scikit-learn: pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float()  # (1797, 8, 8), values 0..16
    x = images[:, None] / 16.0 * 2.0 - 1.0  # (1797, 1, 8, 8) in [-1, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x, torch.from_numpy(bunch.target).long()  # (1797, 1, 16, 16), (1797,)


def load_real_digits() -> torch.Tensor:
    """The 1,797 real digits as a (1797, 1, 16, 16) float tensor in [-1, 1] (the teacher's data).

    scikit-learn's 8x8 images (values 0..16) scaled to [-1, 1] and upsampled bilinearly
    (align_corners=False) to 16x16. Needs scikit-learn (UserError if it is missing).
    """
    return _sklearn_digits()[0].clone()


def load_real_digit_labels() -> torch.Tensor:
    """The 1,797 real digits' labels (1797,) 0..9, in the order of `load_real_digits`."""
    return _sklearn_digits()[1].clone()


def split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out) indices into the 1,797 digits: a fixed permutation, 1,000 / 797."""
    perm = torch.randperm(NUM_DIGITS, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[:TRAIN_SIZE], perm[TRAIN_SIZE:]


def held_out_digits() -> torch.Tensor:
    """The 797 real digits the classifier never saw, (797, 1, 16, 16) in [-1, 1]."""
    return load_real_digits()[split_indices()[1]]


# -- the classifier ------------------------------------------------------------------------------

class DigitClassifier(nn.Module):
    """conv3x3(1->8) - pool - conv3x3(8->16) - pool - linear(256->64) - linear(64->10), ReLUs.

    18,346 parameters; the 64 ReLU outputs before the head are the Frechet features.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 8, 8, 8)
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 4, 4)
            nn.Flatten(),  # (B, 256)
        )
        self.hidden = nn.Sequential(nn.Linear(16 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, 64) of images (B, 1, 16, 16) in [-1, 1]."""
        return self.hidden(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, 10)."""
        return self.head(self.features(x))


def _non_digits(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Images (B, 1, 16, 16) that are not digits, one kind per quarter of the batch: Gaussian noise,
    a flat grey level, the pixels of real digits shuffled, uniform noise."""
    b = len(x)
    kind = torch.arange(b) % 4  # (B,)
    gauss = (torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen)).clamp(-1, 1)
    flat = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1).expand_as(x)
    perm = torch.argsort(torch.rand(b, IMAGE_SIZE * IMAGE_SIZE, generator=gen), dim=1)  # (B, 256)
    shuffled = x.flatten(1).gather(1, perm).view_as(x)
    uniform = torch.rand(x.shape, generator=gen) * 2 - 1
    out = torch.where((kind == 0)[:, None, None, None], gauss, flat)
    out = torch.where((kind == 2)[:, None, None, None], shuffled, out)
    return torch.where((kind == 3)[:, None, None, None], uniform, out)  # (B, 1, 16, 16)


@functools.lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The seeded classifier trained on the 1,000-image split (trained once per process).

    Besides cross-entropy on the real digits it sees as many non-digits (noise, flat grey,
    pixel-shuffled digits) with a uniform target (outlier exposure, Hendrycks et al. 2019), so
    that `confident` means "looks like a digit" rather than "is on some side of a boundary".
    """
    gen = torch.Generator().manual_seed(CLASSIFIER_SEED)
    threads = torch.get_num_threads()
    # One thread: an 18k-parameter CNN gains nothing from more, and the result no longer
    # depends on the machine's core count (reduction order).
    torch.set_num_threads(1)
    # The first call may come from inside no_grad/inference_mode (a caller's evaluation loop).
    with torch.inference_mode(False), torch.enable_grad():
        try:
            return _fit(gen).eval().requires_grad_(False)
        finally:
            torch.set_num_threads(threads)


def _fit(gen: torch.Generator) -> DigitClassifier:
    """Train a fresh DigitClassifier on the 1,000-digit split (Adam, batches of 100 + 100)."""
    x_all, y_all = _sklearn_digits()
    train_idx, _ = split_indices()
    x, y = x_all[train_idx], y_all[train_idx]  # (1000, 1, 16, 16), (1000,)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(CLASSIFIER_SEED)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    model.train()
    for _ in range(CLASSIFIER_EPOCHS):
        for idx in torch.randperm(len(x), generator=gen).split(100):
            logits = model(torch.cat([x[idx], _non_digits(x[idx], gen)]))  # (2B, 10)
            real, fake = logits[:len(idx)], logits[len(idx):]
            # Cross-entropy on digits; cross-entropy to the uniform distribution on non-digits.
            loss = F.cross_entropy(real, y[idx]) - fake.log_softmax(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


# -- the measure ---------------------------------------------------------------------------------

def as_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, 16, 16, 1) or float [-1, 1] (N, 1, 16, 16) -> float (N, 1, 16, 16) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 1):
            raise ShapeMismatchError(
                f"digits quality needs uint8 images (N, 16, 16, 1), got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 1, 16, 16)
    elif x.is_floating_point():
        if x.ndim != 4 or x.shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ShapeMismatchError(
                f"digits quality needs float images (N, 1, 16, 16) in [-1, 1], got {tuple(x.shape)}")
        x = x.detach().float().cpu().clamp(-1, 1)
    else:
        raise UserError(f"digits quality needs uint8 or float images, got {x.dtype}")
    if len(x) < 2:
        raise UserError("digits quality needs at least 2 images (a covariance)")
    return x


@torch.no_grad()
def _probe(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 64), probabilities (N, 10)) of images (N, 1, 16, 16)."""
    model = digit_classifier()
    feats = torch.cat([model.features(b) for b in x.split(512)])  # (N, 64)
    return feats, model.head(feats).softmax(dim=1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature rows a (N, D) and b (M, D).

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), via symmetric eigh (float64).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (D, D)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^1/2
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    tr_cross = np.sqrt(np.clip(cross, 0, None)).sum()
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross
    return max(0.0, float(fd))  # rounding can leave -1e-6 for identical sets


@functools.lru_cache(maxsize=1)
def _held_out_features() -> np.ndarray:
    return _probe(held_out_digits())[0].numpy()  # (797, 64)


@dataclass(frozen=True)
class DigitsQuality:
    """The digits measure of one batch (see the module docstring)."""

    num: int
    confident: float  # fraction with max softmax >= threshold
    balance: float  # normalised entropy of the predicted-class histogram, 0..1
    frechet: float  # vs the 797 held-out real digits' features
    counts: tuple[int, ...]  # predicted class histogram, digits 0..9
    threshold: float = CONFIDENT_THRESHOLD

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self) | {"counts": list(self.counts)}


def measure_digits(images: np.ndarray | torch.Tensor) -> DigitsQuality:
    """The digits measure of a batch: uint8 (N, 16, 16, 1) or float [-1, 1] (N, 1, 16, 16)."""
    x = as_classifier_input(images)
    feats, probs = _probe(x)
    top, pred = probs.max(dim=1)  # (N,), (N,)
    counts = torch.bincount(pred, minlength=NUM_CLASSES)
    p = counts.double() / len(x)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return DigitsQuality(
        num=len(x),
        confident=float((top >= CONFIDENT_THRESHOLD).float().mean()),
        balance=max(0.0, entropy / math.log(NUM_CLASSES)),
        frechet=frechet_distance(feats.numpy(), _held_out_features()),
        counts=tuple(int(c) for c in counts),
    )


def reference_figures(num: int = TRAIN_SIZE, *, seed: int = 0) -> dict[str, Any]:
    """The real-digit figures to set beside the measure of `num` samples.

    held_out: the 797 held-out digits, plus the classifier's accuracy on them. Their `frechet` is
      0 by construction (they are the reference set); their `confident` and `balance` are the
      targets for samples.
    real_subset: `min(num, 1000)` digits drawn (seeded, without replacement) from the classifier's
      1,000-digit training split, which is disjoint from the 797: the `frechet` a set of that many
      real digits gets. Compare samples with it at the same size: the estimate is biased upward
      for small sets (8-14 at 64 digits, depending on the draw; 1.4 at 1,000). The classifier
      has seen these digits, so their `confident` runs higher than the held-out figure.
    """
    x_all, y_all = _sklearn_digits()
    train_idx, held_idx = split_indices()
    held = measure_digits(x_all[held_idx])
    _, probs = _probe(x_all[held_idx])
    accuracy = float((probs.argmax(dim=1) == y_all[held_idx]).float().mean())
    n = max(2, min(int(num), TRAIN_SIZE))
    pick = torch.randperm(TRAIN_SIZE, generator=torch.Generator().manual_seed(seed))[:n]
    subset = measure_digits(x_all[train_idx[pick]])
    return {"held_out": held.to_dict() | {"classifier_accuracy": accuracy},
            "real_subset": subset.to_dict() | {"seed": seed}}


def nearest_real_distance(images: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How close samples sit to the teacher's training digits: a check for copying.

    For each image, the RMS pixel distance (in [-1, 1] units) to its nearest of the 1,797 real
    digits; returns the median and the 10% quantile, beside the same figures for each real digit
    and its nearest other real digit. Samples far closer than real digits are to one another
    would be copies of the training set.
    """
    x = as_classifier_input(images).flatten(1)  # (N, 256)
    real = _sklearn_digits()[0].flatten(1)  # (1797, 256)
    scale = math.sqrt(x.shape[1])
    to_real = torch.cdist(x, real).min(dim=1).values / scale  # (N,)
    real_real = torch.cdist(real, real).fill_diagonal_(float("inf")).min(dim=1).values / scale
    return {
        "samples_median": float(to_real.median()), "samples_q10": float(to_real.quantile(0.1)),
        "real_median": float(real_real.median()), "real_q10": float(real_real.quantile(0.1)),
    }


def class_consistency(images: np.ndarray | torch.Tensor, labels: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """How often a class-conditional digits model draws the digit it was asked for: the fraction
    of samples of class c that the classifier labels c, per class and over all samples.

    images: uint8 (N, 16, 16, 1) or float [-1, 1] (N, 1, 16, 16); labels (N,) in 0..9.
    """
    x = as_classifier_input(images)
    y = torch.as_tensor(np.asarray(labels)).long()
    if y.shape != (len(x),):
        raise ShapeMismatchError(f"{len(x)} images but labels of shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise UserError(f"class consistency is for the ten digit classes 0..9, got labels "
                        f"{int(y.min())}..{int(y.max())}")
    _, probs = _probe(x)
    hit = (probs.argmax(dim=1) == y).float()  # (N,)
    per_class = {int(c): round(float(hit[y == c].mean()), 6) for c in y.unique()}
    return {"consistency": float(hit.mean()), "per_class": per_class,
            "counts": {int(c): int((y == c).sum()) for c in y.unique()}}
