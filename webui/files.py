"""Crash-safe file replacement: a crash or a full disk at any moment leaves the old file whole."""

import errno
import os
import tempfile
from pathlib import Path

from .errors import WebUIError

# errno values that mean "no room left", as opposed to permissions or a broken disk.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".bak")


def write_atomic(path: Path, data: bytes, keep_backup: bool = False) -> None:
    """Replace `path` by `data`: write a private temp file in the same folder, fsync it, then rename it
    over the target. With `keep_backup`, the version being replaced becomes `<name>.bak` first."""
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(data)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        if keep_backup and path.exists():
            _replace_backup(path)
        os.replace(temp_name, path)
        _fsync_folder(path.parent)
    except BaseException as exc:
        _remove_quietly(Path(temp_name))
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from exc
        raise


def storage_error(exc: OSError, path: Path) -> WebUIError:
    """Word an OS failure to write `path` for the user; the previous file is intact either way."""
    if exc.errno in _NO_SPACE:
        return WebUIError(
            "disk_full",
            f"The disk holding {path.parent} is full; free some space and try again (nothing was lost).",
        )
    return WebUIError(
        "storage",
        f"Could not write {path.name} ({exc.strerror or exc}); check that {path.parent} is writable.",
    )


def _replace_backup(path: Path) -> None:
    # A hard link gives the backup name the current contents without copying, and renaming the link
    # into place is atomic, so there is never a moment with a half-written backup.
    link_name = path.with_name(f".{path.name}.bak-link")
    _remove_quietly(link_name)
    os.link(path, link_name)
    os.replace(link_name, backup_path(path))


def _fsync_folder(folder: Path) -> None:
    # The rename is only durable once the folder entry itself reaches the disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
