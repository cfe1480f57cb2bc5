"""Files written whole or not at all, and output folders checked before the work that fills them."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A reader never sees a half-written file, a crash leaves the old one, and processes writing the same
    path at once (shards of one evaluation saving the same plan) each rename a complete file of their own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def existing_folder(path: str | Path, setting: str) -> Path:
    """``path`` or its nearest existing parent, which must be a folder: a file there (``path`` itself, or
    a parent of it) is a :class:`bac.ConfigError` naming ``setting``."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (its parent {candidate} is a file)"
                raise ConfigError(f"setting {setting}: {path} is not a folder{where}; name a folder")
            return candidate
    raise ConfigError(f"setting {setting}: none of the folders above {path} exists (was the current folder removed?)")


def check_output_folder(path: str | Path, setting: str) -> Path:
    """Refuse a folder that cannot be written (a file, under a file, no permission, a read-only mount).

    Creates nothing: a probe file is made in the folder, or in its nearest existing parent when the folder
    does not exist yet, and removed. Raises :class:`bac.ConfigError` naming ``setting``.
    """
    path = Path(path)
    existing = existing_folder(path, setting)
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".bac-write-probe-")
    except OSError as err:
        raise ConfigError(f"setting {setting}: cannot write in {existing} ({err.strerror or err}); "
                          "choose a folder you can write") from None
    os.close(handle)
    os.unlink(probe)
    return path


def check_free_space(path: str | Path, needed: int, setting: str, what: str) -> None:
    """Refuse to start work that will write about ``needed`` bytes (``what`` says what, and how it was
    estimated) under ``path`` when its file system has less free space."""
    free = shutil.disk_usage(existing_folder(Path(path), setting)).free
    if free < needed:
        raise ConfigError(f"setting {setting}: {path} has {_size(free)} free, {what} needs about {_size(needed)}; "
                          "free some space or choose another folder")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
