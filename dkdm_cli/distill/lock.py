"""One `dkdm distill` per run directory at a time.

The lock is an advisory `fcntl.flock` on `<run_dir>/.dkdm.lock` (stdlib, no dependency): the
kernel releases it when the holder exits for any reason, `kill -9` included, so a stale lock
never blocks the next run. The file holds the holder's PID, only so the refusal can name it; it
is the one file dkdm writes in place (a lock must keep its inode). Platforms without fcntl
(Windows) run unlocked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from dkdm_cli.errors import RunLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".dkdm.lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory; `acquire` raises RunLockedError
    naming the PID that holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError (never waits)."""
        if fcntl is None:
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by another dkdm distill (PID {holder}); wait for it "
                "to finish or stop it, or choose another --run-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
