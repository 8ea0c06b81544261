"""Reading PyTorch weight files (.pt, .pth, .bin) that users hand us, without unpickling code.

One reader for every such file (improved/guided-diffusion checkpoints, diffusers `.bin` weights,
Inception weights): `torch.load(weights_only=True)`, memory-mapped where the file allows, then a
check that it holds a mapping of names to tensors. Anything else is refused in one line that
never suggests loading it unsafely.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

from dkdm_cli.errors import ModelFileError

# The first line of every Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"


def refuse_lfs_pointer(path: Path, *, what: str = "weights file") -> None:
    """A repository cloned without Git LFS holds ~130-byte pointer files where the weights should
    be; every reader would call them corrupt. Say what they are and how to get the real files."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(LFS_POINTER))
    except OSError:
        return  # the reader itself reports an unreadable file
    if head == LFS_POINTER:
        raise ModelFileError(f"{path}: a Git LFS pointer, not the {what} itself (the repository was "
                             "checked out without Git LFS); run `git lfs pull` in it, or download "
                             "the files")


def read_tensor_dict(path: Path, *, what: str = "weights file") -> dict[str, torch.Tensor]:
    """{name: tensor} from a PyTorch file (a `{"state_dict": {...}}` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    refuse_lfs_pointer(path, what=what)
    errors = (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError,
              TypeError, ImportError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol chatter is not for users
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (pre-zip) files cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except errors as exc:
        # torch's own message goes on to explain how to unpickle anyway: say only what it needs.
        needs = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = f"it needs {needs.group(1)}" if needs else (
            f"{type(exc).__name__}: it holds other Python objects, or is not a PyTorch file")
        raise ModelFileError(f"{path}: not a plain {what} of tensors ({why}); dkdm reads only "
                             "tensors from such files, with torch.load(weights_only=True)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                            for k, v in obj.items()):
        raise ModelFileError(f"{path}: not a plain {what} (expected a mapping of names to tensors)")
    return obj
