"""Checkpoints written beside the loop instead of in it.

A checkpoint with the pool is large (0.6-2.5 GB at 64x64x3, batch 128, rho 0.4), and writing it
synchronously stalls training for seconds at every `save_every`. The loop now pays only for a
snapshot: every tensor copied to host memory at once (the pool and the weights change in place
at the next iteration, so a resumed run would not be bit-exact from the live tensors). A
background thread then writes the snapshot atomically (temp file + rename, as before) and
prunes old checkpoints. One write at a time: a new save first waits for the previous one, and
the run waits for the last one before it returns, so "saved" still means on disk.

A failed write (disk full) is raised in the loop at the next save or at the end, as the same
one-line StorageError a synchronous write raises; the previous checkpoints are untouched.

The execution policy decides (precision.Policy.background_saves): in the background where the
loop runs on an accelerator, in the loop on the CPU, where a writer thread can only take cores
from the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dkdm_cli.checkpoint import save_checkpoint


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous host copies of `tensors`, independent of the live ones."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


class CheckpointWriter:
    """Writes one checkpoint at a time on a background thread (`background=False`: in the
    caller, for tests and for the last save before exit)."""

    def __init__(self, *, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any],
               after: Callable[[], None] | None = None) -> None:
        """Snapshot `tensors` now; write them to `path` (then run `after`, e.g. pruning)."""
        self.wait()
        # In the caller's thread nothing changes the tensors while they are written: no copy.
        data = snapshot(tensors) if self.background else tensors

        def write() -> None:
            save_checkpoint(path, data, doc)
            if after is not None:
                after()

        if not self.background:
            write()
            return
        self._thread = threading.Thread(target=self._run, args=(write,), name="dkdm-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:  # re-raised in the loop's thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the pending write is on disk; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
