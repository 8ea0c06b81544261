"""Writing files so that a crash, a kill or a full disk never leaves a half-written one.

Every file dkdm writes goes through `atomic_write`: a temp file in the same folder
(`.<name>.<random>.tmp`), flushed and fsynced, then renamed over the target. A failure removes
the temp file and leaves the previous version of the target untouched. A temp file left by a
killed process (`kill -9` during a save) is removed by `remove_stale_temps` on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dkdm_cli.errors import UserError, from_os_error

TEMP_SUFFIX = ".tmp"
# `.<target name>.<mkstemp's 8 random chars>.tmp`
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; on success it is fsynced and renamed to `path`
    (mode as for a new file under the umask), on any failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        # Name the file the user knows, not our temp file (mkstemp's failure names its own).
        if isinstance(exc, OSError) and (tmp is None or exc.filename in (None, str(tmp))):
            exc.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temp folder beside `path` to fill; on success it replaces `path` (a folder the caller
    has checked may be replaced) by renames, on any failure it is removed and `path` is as it
    was. A crash between the two renames leaves the old folder as `.<name>.<random>.old`."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; use the usual mode
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)  # renames a folder onto the empty temp folder
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(fh)` on a binary temp file, then move it to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_bytes(path: Path, data: bytes) -> Path:
    """Atomically write bytes."""
    return atomic_write(path, lambda fh: fh.write(data))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove temp files of interrupted atomic writes in `folder` (not recursive); returns them.

    Only call this on a folder no other process writes to (a locked run directory)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP_RE.match(p.name) and p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def check_target(path: Path, *, flag: str, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written as asked: a folder that
    exists as a file, a file name that is a folder, a parent that is a file, or a folder (the
    nearest one that exists) the process may not create files in, e.g. on a read-only mount."""
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise UserError(f"{flag} {path}: exists and is a file, not a folder")
        if not folder and p.is_dir():
            raise UserError(f"{flag} {path}: is a folder; give a file name")
    base = p.absolute() if folder and p.is_dir() else None
    for parent in p.absolute().parents if base is None else ():
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
            base = parent
            break
    if base is not None and not os.access(base, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_mount(base) else errno.EACCES
        raise from_os_error(OSError(code, os.strerror(code), str(path)), doing=flag)


def _read_only_mount(folder: Path) -> bool:
    if not hasattr(os, "statvfs"):  # Windows: no mount flags to read
        return False
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def safetensors_os_error(exc: Exception, path: Path) -> OSError:
    """safetensors reports I/O failures (a full disk) as SafetensorError, which is not an
    OSError; recover the errno from its message so callers handle both alike."""
    m = re.search(r"os error (\d+)|code: (\d+)", str(exc))  # "...device (os error 28)"
    code = int(m.group(1) or m.group(2)) if m else errno.EIO
    return OSError(code, os.strerror(code), str(path))
