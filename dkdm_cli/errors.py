"""The error tree. Library code raises these; `cli.main` turns them into one-line messages.

Exit codes: 2 for anything the user can fix (bad input, config, missing file), 1 for a
failed run (a bound crossed, NaN loss), 130 for an interrupt.
"""

from __future__ import annotations


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


class ExportCheckError(DkdmError):
    """An exported model does not reproduce PyTorch's outputs. Exit code 1."""


class ThresholdError(DkdmError):
    """An evaluation bound given with --fail-above was crossed. Exit code 1."""
