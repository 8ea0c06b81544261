"""Inception-v3 features through torch-fidelity, with weights that also work offline.

The network is torch-fidelity's `inception-v3-compat` (a port of the TensorFlow graph the FID,
IS and KID papers used). Its weights come from, in order:
  1. --inception-weights PATH / [eval] inception_weights / DKDM_INCEPTION_WEIGHTS;
  2. torch's hub cache, where torch-fidelity's own download puts them
     ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth);
  3. a download by torch-fidelity's URL, only after a quick check (at most OFFLINE_PROBE_S
     seconds) that the network answers; offline, an OfflineError says what to fetch and where.
Weights are always read with torch.load(weights_only=True): torch-fidelity itself unpickles a
given file with weights_only=False, so the state dict is loaded here and handed to it.

One forward yields every feature group the requested metrics need:
  "2048"             (N, 2048)  pool_3, for FID, KID and precision/recall
  "logits_unbiased"  (N, 1008)  logits without the bias, for the Inception Score
  "spatial"          (N, 2023)  the first 7 channels of mixed_6/conv (torch-fidelity's Mixed_6d.branch1x1,
                      17x17), flattened in NHWC order as ADM's evaluator does, for sFID
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from dkdm_cli import _fs, _offline
from dkdm_cli.errors import ModelFileError, OfflineError, UserError
from dkdm_cli.tensorfile import read_tensor_dict, refuse_lfs_pointer

EXTRACTOR = "inception-v3-compat"
ENV_WEIGHTS = "DKDM_INCEPTION_WEIGHTS"
OFFLINE_PROBE_S = 3.0
# Feature groups are torch-fidelity's feature names, plus "spatial" (from a hook).
POOL, LOGITS, SPATIAL = "2048", "logits_unbiased", "spatial"
SMALL_LAYERS = ("64", "192", "768")  # torch-fidelity's early exits (fast tests only)
GROUPS = (*SMALL_LAYERS, POOL, LOGITS, SPATIAL)
SPATIAL_CHANNELS = 7


def weights_url() -> str:
    """torch-fidelity's download URL for its Inception weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def hub_weights_path() -> Path:
    """Where torch-fidelity's download lands (and where an offline copy may be put)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url()).name


def known_sha256_prefix() -> str:
    """The start of the sha256 of torch-fidelity's weights, as its file name carries it
    (torch.hub's `name-<sha256 prefix>.pth` convention, which its download checks too)."""
    from torch.hub import HASH_REGEX

    found = HASH_REGEX.search(Path(weights_url()).name)
    return found.group(1) if found else ""


@dataclass(frozen=True)
class InceptionWeights:
    """A weights file and what identifies it in results and cache keys."""

    path: Path
    sha256: str
    source: str  # flag | env | hub-cache | download
    known: bool = True  # the sha256 is torch-fidelity's (else accepted with allow_unknown)

    def describe(self) -> dict:
        """JSON-ready form."""
        return {"name": EXTRACTOR, "weights": str(self.path), "weights_sha256": self.sha256,
                "weights_known": self.known, "weights_source": self.source, "url": weights_url()}


def is_offline(host: str = "github.com", port: int = 443, timeout: float = OFFLINE_PROBE_S) -> bool:
    """True when dkdm's offline switch is on (`dkdm_cli._offline.is_offline`: HF_HUB_OFFLINE or
    DKDM_OFFLINE, in any spelling huggingface_hub accepts) or the network does not answer."""
    return _offline.is_offline() or network_unreachable(host, port, timeout)


def network_unreachable(host: str = "github.com", port: int = 443,
                        timeout: float = OFFLINE_PROBE_S) -> bool:
    """True when `host` does not answer within `timeout` seconds (DNS included: the probe runs
    in a daemon thread, so it never hangs the caller)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return not ok


def _offline_message(reason: str) -> str:
    return (f"Inception weights are needed and {reason}. Fetch {weights_url()} and put it at "
            f"{hub_weights_path()} (torch's hub cache, found automatically), or pass "
            f"--inception-weights PATH (or set {ENV_WEIGHTS}=PATH)")


def file_sha256(path: Path, *, cache_dir: Path | None = None) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a 90 MB file is hashed once."""
    path = Path(path)
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = (cache_dir / "file-hashes.json") if cache_dir is not None else None
    known: dict[str, str] = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
        if stamp in known:
            return known[stamp]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        known[stamp] = value
        try:
            _fs.write_text(memo, json.dumps(known))
        except OSError:
            pass  # only a memo: hashing again next time is correct, just slower
    return value


def resolve_weights(explicit: str | None = None, *, quiet: bool = False,
                    cache_dir: Path | None = None, allow_unknown: bool = False) -> InceptionWeights:
    """Find (or download) the Inception weights; never hangs when offline. A file whose sha256
    is not torch-fidelity's is refused unless `allow_unknown`: other weights of the same shapes
    load fine and give scores that compare with nothing (random ones give IS = 1)."""
    if explicit:
        path, source = Path(explicit).expanduser(), "flag"
    elif os.environ.get(ENV_WEIGHTS):
        path, source = Path(os.environ[ENV_WEIGHTS]).expanduser(), "env"
    else:
        path, source = hub_weights_path(), "hub-cache"
        if not path.is_file():
            reason = _offline.offline_reason() or (
                "the network is unreachable" if network_unreachable() else None)
            if reason:
                raise OfflineError(_offline_message(f"downloads are off ({reason})"))
            _download(path, quiet=quiet)
            source = "download"
    if not path.is_file():
        where = "--inception-weights" if source == "flag" else ENV_WEIGHTS
        raise UserError(f"{where} {path}: no such file. " + _offline_message("none were found"))
    refuse_lfs_pointer(path, what="Inception weights file")
    sha256 = file_sha256(path, cache_dir=cache_dir)
    prefix = known_sha256_prefix()
    known = sha256.startswith(prefix)
    if not known and not allow_unknown:
        raise ModelFileError(
            f"{path}: sha256 {sha256[:16]}... is not that of torch-fidelity's Inception weights "
            f"({Path(weights_url()).name}, sha256 {prefix}...), so its scores would compare with "
            f"no others; fetch {weights_url()}, or pass --allow-unknown-inception to score with "
            "this file anyway")
    return InceptionWeights(path=path, sha256=sha256, source=source, known=known)


def _download(path: Path, *, quiet: bool) -> None:
    """torch's hub download of torch-fidelity's weights into `path`."""
    try:
        torch.hub.download_url_to_file(weights_url(), str(path), progress=not quiet)
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise OfflineError(_offline_message(f"the download failed ({exc})")) from exc


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights as a state dict, read without unpickling arbitrary objects (memory-mapped
    when the file is in torch's zip format, which makes loading ~3x faster)."""
    return read_tensor_dict(Path(path), what="Inception weights file")


@contextmanager
def _hand_state(state: dict[str, torch.Tensor]):
    # torch-fidelity loads a weights *path* with weights_only=False; give it the dict we loaded
    # safely by standing in for its downloader while it is constructed.
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
        yield fe.FeatureExtractorInceptionV3


def build_extractor(weights: InceptionWeights, groups: Iterable[str], *,
                    device: torch.device | str = "cpu") -> FeatureExtractor:
    """The Inception network, ready to produce the given feature groups."""
    state = load_state(weights.path)
    groups = tuple(g for g in GROUPS if g in set(groups))
    # torch-fidelity stops its forward once the listed features exist; with spatial alone,
    # "768" (right after Mixed_6e) is the earliest exit past Mixed_6d.
    listed = [g for g in groups if g != SPATIAL]
    if SPATIAL in groups and not {"768", POOL, LOGITS} & set(listed):
        listed.append("768")
    # Built on the meta device (no random initialisation to throw away), where torch-fidelity's
    # own strict load_state_dict still checks every key and shape; the weights are then assigned.
    with _hand_state(state) as cls, torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": intended
        try:
            net = cls(EXTRACTOR, listed, feature_extractor_weights_path=None)
        except RuntimeError as exc:  # load_state_dict: missing / unexpected / mis-shaped keys
            raise ModelFileError(f"{weights.path}: not torch-fidelity Inception weights ({exc})") \
                from exc
    net.load_state_dict(state, assign=True)
    net.requires_grad_(False).eval()
    return FeatureExtractor(net.to(device), listed, groups, torch.device(device))


class FeatureExtractor:
    """torch-fidelity's Inception plus a hook for ADM's spatial features."""

    def __init__(self, net, listed: list[str], groups: tuple[str, ...], device: torch.device):
        self.net, self.listed, self.groups, self.device = net, listed, groups, device
        self._spatial: list[torch.Tensor] = []
        if SPATIAL in groups:
            net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, args, output: torch.Tensor) -> None:
        x = output[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
        self._spatial.append(x.permute(0, 2, 3, 1).reshape(len(x), -1).float().cpu())  # (B, 2023)

    @torch.no_grad()
    def __call__(self, batch: np.ndarray) -> dict[str, torch.Tensor]:
        """Features of a batch (B, H, W, 3) uint8."""
        x = torch.tensor(batch).permute(0, 3, 1, 2)  # (B, 3, H, W); a copy: batch may be read-only
        self._spatial.clear()
        out = self.net(x.to(self.device))
        named = dict(zip(self.listed, out, strict=True))
        feats = {g: named[g].float().cpu() for g in self.groups if g != SPATIAL}
        if SPATIAL in self.groups:
            feats[SPATIAL] = self._spatial.pop()
        return feats

    def extract(self, batches: Iterable[np.ndarray],
                on_batch: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
        """Features of every batch, concatenated: {group: (N, D) float32}."""
        parts: dict[str, list[torch.Tensor]] = {g: [] for g in self.groups}
        for batch in batches:
            for group, value in self(batch).items():
                parts[group].append(value)
            if on_batch is not None:
                on_batch(len(batch))
        return {g: torch.cat(v).numpy() for g, v in parts.items() if v}
