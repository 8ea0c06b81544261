"""The numbers: FID, IS, KID and precision/recall by torch-fidelity's own functions (so they
equal `torch_fidelity.calculate_metrics` on the same images), sFID as ADM's evaluator defines
it, and the --fail-above bounds.

Differences from torch-fidelity's defaults, on purpose:
  * precision/recall use Inception pool_3 features (ADM's evaluator, as the DKDM paper reports),
    not VGG-16, so one network and one weights file serve every metric;
  * KID's subset size is min(1000, N_samples, N_reference), so small sets still get a score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from dkdm_cli.errors import UserError
from dkdm_cli.evaluate.inception import LOGITS, POOL, SPATIAL

METRIC_FLAGS = ("fid", "isc", "kid", "prc", "sfid", "consistency")
# Metrics that need no Inception network (the digits classifier's class consistency).
NO_INCEPTION = frozenset({"consistency"})
# Every value a run can report, with the flag that computes it and which way is better.
VALUES = {
    "fid": ("fid", "lower"), "sfid": ("sfid", "lower"),
    "isc": ("isc", "higher"), "isc_std": ("isc", "-"),
    "kid": ("kid", "lower"), "kid_std": ("kid", "-"),
    "precision": ("prc", "higher"), "recall": ("prc", "higher"), "f_score": ("prc", "higher"),
    "consistency": ("consistency", "higher"),
}
ALIASES = {"is": "isc", "inception_score": "isc", "kid_mean": "kid", "isc_mean": "isc"}


@dataclass(frozen=True)
class MetricSettings:
    """Everything besides the images that changes a score (all recorded in --json)."""

    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set's size
    kid_degree: int = 3
    kid_coef0: float = 1.0
    prc_neighborhood: int = 3
    rng_seed: int = 2020  # torch-fidelity's default: shuffles of IS, subsets of KID
    # torch-fidelity feature names; "2048" is the standard. Smaller layers ("64", "192", "768")
    # only exist to make tests on a CPU fast.
    fid_layer: str = "2048"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def groups_for(metrics: set[str], settings: MetricSettings, *, samples: bool,
               ref_stats: frozenset[str] = frozenset()) -> set[str]:
    """Feature groups needed from the samples (or, samples=False, from the reference images,
    given which Frechet statistics the reference already provides: "fid", "sfid")."""
    need = set()
    if "fid" in metrics and (samples or "fid" not in ref_stats):
        need.add(settings.fid_layer)
    if {"kid", "prc"} & metrics:
        need.add(POOL)
    if "isc" in metrics and samples:
        need.add(LOGITS)
    if "sfid" in metrics and (samples or "sfid" not in ref_stats):
        need.add(SPATIAL)
    return need


# -- Frechet distances --------------------------------------------------------------------------

def fid_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """torch-fidelity's (mu, sigma) of (N, D) features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))


def fid_from_statistics(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """torch-fidelity's Frechet distance (eigenvalues of sigma_a @ sigma_b)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu_dtype, sigma_dtype = a["mu"].dtype, a["sigma"].dtype
    b = {"mu": np.asarray(b["mu"], dtype=mu_dtype), "sigma": np.asarray(b["sigma"], dtype=sigma_dtype)}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise UserError(f"reference statistics have dimension {b['mu'].shape}, the features "
                        f"{a['mu'].shape}: were they made with another network or layer?")
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with the trace of the square root
    from symmetric eigendecompositions: S1 S2 is similar to A S2 A (A = S1^1/2), which is
    symmetric PSD, so tr((S1 S2)^1/2) = sum sqrt(eig(A S2 A)). Several times faster than a
    general eigensolver at D = 2048 and free of its spurious complex parts."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^1/2, (D, D)
    lam = np.linalg.eigvalsh(root @ s2 @ root)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """The Frechet distance between the Gaussians fitted to two feature sets (N1, D), (N2, D).

    With few samples (N <= D) it is computed exactly in the samples' span: for centred X1, X2,
    the non-zero eigenvalues of S1 S2 are the squared singular values of X1 X2^T / sqrt(c),
    c = (N1 - 1)(N2 - 1), so no D x D matrix is ever decomposed."""
    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    n1, n2, d = len(x1), len(x2), x1.shape[1]
    if max(n1, n2) > d:
        return frechet_distance(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0),
                                np.cov(x2, rowvar=False))
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)  # (N1, D), (N2, D)
    cross = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = x1.mean(0) - x2.mean(0)
    return float(diff @ diff + (c1 * c1).sum() / (n1 - 1) + (c2 * c2).sum() / (n2 - 1) - 2 * cross)


def frechet_distance_to_statistics(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance between features (N, D) and stored statistics (mu, sigma).

    With N <= D, S1 = Xc^T Xc / (N - 1) has rank < N and the non-zero eigenvalues of S1 S2 are
    those of the N x N symmetric matrix Xc S2 Xc^T / (N - 1): exact, and no D x D decomposition."""
    x = np.asarray(x, np.float64)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.shape != x.shape[1:] or sigma.shape != (x.shape[1], x.shape[1]):
        raise UserError(f"reference statistics have dimension {mu.shape}, the features "
                        f"({x.shape[1]},): were they made with another network or layer?")
    n = len(x)
    if n > x.shape[1]:
        return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
    c = x - x.mean(0)  # (N, D)
    lam = np.linalg.eigvalsh(c @ sigma @ c.T / (n - 1))  # (N,)
    diff = x.mean(0) - mu
    return float(diff @ diff + (c * c).sum() / (n - 1) + np.trace(sigma)
                 - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


# -- the metrics ---------------------------------------------------------------------------------

def _check_count(what: str, n: int, need: int, why: str) -> None:
    if n < need:
        raise UserError(f"{what} needs at least {need} images ({why}), got {n}")


def inception_score(logits: np.ndarray, s: MetricSettings) -> dict[str, float]:
    """IS mean and std over `isc_splits` splits of the (shuffled) samples."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    _check_count("the Inception Score", len(logits), s.isc_splits, "one per split")
    out = isc_features_to_metric(torch.from_numpy(logits), s.isc_splits, True, s.rng_seed)
    return {"isc": out["inception_score_mean"], "isc_std": out["inception_score_std"]}


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, s: MetricSettings) -> dict[str, float]:
    """KID (polynomial kernel, unbiased MMD^2) mean and std over random subsets."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(s.kid_subset_size, len(f1), len(f2))
    _check_count("KID", size, 2, "per subset")
    out = kid_features_to_metric(
        torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=s.kid_subsets,
        kid_subset_size=size, kid_kernel="poly", kid_kernel_poly_degree=s.kid_degree,
        kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=s.kid_coef0, rng_seed=s.rng_seed,
        verbose=False)
    return {"kid": out["kernel_inception_distance_mean"], "kid_std": out["kernel_inception_distance_std"]}


def precision_recall(f1: np.ndarray, f2: np.ndarray, s: MetricSettings) -> dict[str, float]:
    """Improved precision/recall (k-NN manifolds): samples f1 against reference f2."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    for what, n in (("precision/recall (samples)", len(f1)), ("precision/recall (reference)", len(f2))):
        _check_count(what, n, s.prc_neighborhood + 1, f"k = {s.prc_neighborhood} neighbours")
    out = prc_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2),
                                 prc_neighborhood=s.prc_neighborhood, prc_batch_size=10000,
                                 save_cpu_ram=False, verbose=False)
    return {k: float(out[k]) for k in ("precision", "recall", "f_score")}


# -- bounds --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bound:
    """--fail-above METRIC=VALUE: the run fails when the metric is greater than VALUE."""

    metric: str
    limit: float

    def crossed(self, values: dict[str, float]) -> bool:
        """Whether the computed value lies above the limit (NaN counts as crossed)."""
        value = values[self.metric]
        return not (value <= self.limit)


def parse_bound(text: str) -> Bound:
    """'fid=12.5' -> Bound('fid', 12.5); anything malformed is a UserError (exit 2)."""
    name, sep, raw = text.partition("=")
    name = ALIASES.get(name.strip().lower(), name.strip().lower())
    if not sep or not name or not raw.strip():
        raise UserError(f"--fail-above {text!r}: expected METRIC=VALUE, e.g. fid=12.5")
    if name not in VALUES:
        raise UserError(f"--fail-above {text!r}: unknown metric {name!r}; "
                        f"one of {', '.join(VALUES)}")
    try:
        limit = float(raw)
    except ValueError:
        raise UserError(f"--fail-above {text!r}: {raw.strip()!r} is not a number") from None
    if not math.isfinite(limit):
        raise UserError(f"--fail-above {text!r}: the bound must be a finite number")
    return Bound(name, limit)
