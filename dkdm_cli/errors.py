"""The error tree. Library code raises these; `cli.main` turns them into one-line messages.

Exit codes: 2 for anything the user can fix (bad input, config, missing file), 1 for a
failed run (a bound crossed, NaN loss), 130 for an interrupt.
"""

from __future__ import annotations

import errno
import os


class DkdmError(Exception):
    """Base class of every error dkdm raises on purpose."""

    exit_code = 1


class UserError(DkdmError):
    """Bad input: a wrong flag, file, name or value. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration file or override is malformed, has an unknown key or a bad value."""


class RegistryError(UserError):
    """An unknown registry name (model, teacher, student)."""


class ModelFileError(UserError):
    """A model or checkpoint file is missing, corrupt, or does not match its architecture."""


class CheckpointError(ModelFileError):
    """A checkpoint cannot be read or written."""


class TeacherError(UserError):
    """A teacher spec cannot be resolved or loaded."""


class OfflineError(UserError):
    """Something must be downloaded but the network or hub is unavailable."""


class ShapeMismatchError(UserError):
    """Teacher and student (or model and data) do not fit together."""


class TrainingError(DkdmError):
    """The run failed (e.g. a non-finite loss). Exit code 1; the last good checkpoint is kept."""


class SamplingError(DkdmError):
    """A model's samples came out non-finite (broken weights, or settings it cannot take).
    Exit code 1, like a non-finite loss; nothing is written."""


class ExportCheckError(DkdmError):
    """An exported model does not reproduce PyTorch's outputs. Exit code 1."""


class ThresholdError(DkdmError):
    """An evaluation bound given with --fail-above was crossed. Exit code 1."""


class RunLockedError(UserError):
    """Another process is using the run directory."""


class StorageError(DkdmError):
    """The file system refused a write or read (full disk, read-only, I/O error). Exit code 1:
    the input was fine, the environment was not; nothing already saved was lost."""


class Interrupted(BaseException):
    """A second stop signal: abort at once with this exit code (130 for Ctrl-C, 143 for TERM)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


# errno -> (what to tell the user, whether it is their path (exit 2) or the machine (exit 1))
_OS_ADVICE: dict[int, tuple[str, bool]] = {
    errno.ENOSPC: ("no space left on the device: free some space or write elsewhere, then run "
                   "the command again", False),
    errno.EDQUOT: ("disk quota exceeded: free some space or write elsewhere", False),
    errno.EIO: ("input/output error: check the disk", False),
    errno.EROFS: ("read-only file system: choose a writable location", True),
    errno.EACCES: ("permission denied: choose a location you may write to (or fix its "
                   "permissions)", True),
    errno.EPERM: ("operation not permitted: choose another location", True),
    errno.ENOTDIR: ("a part of this path is a file, not a folder: choose another path", True),
    errno.EISDIR: ("is a folder, a file was expected: give a file name", True),
    errno.EEXIST: ("already exists and is in the way: choose another path", True),
    errno.ENOENT: ("no such file or folder", True),
    errno.ENAMETOOLONG: ("file name too long", True),
}


def from_os_error(exc: OSError, *, doing: str = "") -> DkdmError:
    """A one-line DkdmError for a file-system failure: exit 2 where the user's path is the
    problem (read-only, permission, not a folder), 1 where the machine is (full disk, I/O).
    Files written before the failure are intact: every write is atomic."""
    path = exc.filename or ""
    advice, user_path = _OS_ADVICE.get(
        exc.errno or 0, (exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc)), False))
    where = f"{path}: " if path else ""
    what = f"{doing}: " if doing else ""
    cls = UserError if user_path else StorageError
    return cls(f"{what}{where}{advice}; files saved before are intact")
