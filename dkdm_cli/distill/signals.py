"""Stop signals: save at the next iteration boundary, then exit.

Ctrl-C (SIGINT), SIGTERM (what SLURM, Kubernetes and torchrun send before killing, e.g. on
preemption) and SIGUSR1 (what `#SBATCH --signal=USR1@120` sends ahead of the time limit) each
ask the loop to stop at the next iteration boundary; the run then saves a checkpoint and exits
130 (SIGINT) or 143 (the others). A second signal aborts at once (`errors.Interrupted`).

During the start-up (building the state pool or the teacher samples, which can take minutes) a
stop is seen at the next teacher step (`StartupWatch`): the run exits at once with the same code.
Nothing of a half-built start-up is saved; the next run builds it again from the same seed, so
it is the same as if it had never been stopped.
"""

from __future__ import annotations

import signal

from dkdm_cli.errors import Interrupted

# signal -> exit code of a run it stopped
EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}
if hasattr(signal, "SIGUSR1"):
    EXIT_CODES[signal.SIGUSR1] = 143


class StopFlag:
    """While entered, the stop signals set `requested` instead of killing the process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The exit code for the signal that stopped the run."""
        return EXIT_CODES.get(self.signum, 130) if self.signum is not None else 0

    @property
    def name(self) -> str:
        """The stopping signal's name, e.g. 'SIGTERM'."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask the loop to stop, as the signal `signum` would."""
        self.signum = signum

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(EXIT_CODES.get(signum, 130))
        self.signum = signum

    def __enter__(self) -> StopFlag:
        for signum in EXIT_CODES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (some embedders): keep the defaults
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class StoppedDuringStartup(Exception):
    """A stop signal arrived during the start-up, before the first iteration: nothing to save."""


class StartupWatch:
    """The observer the start-up reports its progress to (`phase`, `advance`): every tick, one
    per teacher step, first checks the stop flag, so a stop ends the start-up within a step
    instead of after it (a scheduler's grace period is often 30 s)."""

    def __init__(self, observer, stop: StopFlag) -> None:
        self.observer, self.stop = observer, stop

    def phase(self, description: str, total: int, completed: int = 0) -> None:
        """Start a progress phase on the real observer."""
        self.observer.phase(description, total=total, completed=completed)

    def advance(self, n: int = 1, status: str | None = None) -> None:
        """Raise StoppedDuringStartup if a stop signal arrived, else advance the progress."""
        if self.stop.requested:
            raise StoppedDuringStartup(self.stop.name)
        self.observer.advance(n, status=status)
