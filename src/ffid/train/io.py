"""Atomic writes of the trainer's own small files and of whole state folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..checkpoint.atomic import cleanup_stale_temps, temp_prefix, write_bytes_atomic
from ..errors import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :mod:`ffid.checkpoint.atomic`), creating its folder."""
    path = Path(path)
    make_output_dir(path.parent)
    write_bytes_atomic(path, data)


def make_output_dir(folder: Path) -> None:
    """Create an output folder (and its parents), or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"output_dir {str(folder)!r} is an existing file, not a folder; name a folder"
        ) from None
    except PermissionError:
        raise ConfigError(
            f"output_dir {str(folder)!r} cannot be created (permission denied); choose another folder"
        ) from None


STATE_TEMP_SUFFIX = ".tmp"


def temp_dir_for(final: Path) -> Path:
    """A fresh temp folder next to ``final`` (same file system, so the rename is atomic).

    Its name carries this process's pid, so temp folders of killed trainers (and the ``.old``
    folder of a killed commit) are recognised and removed here, by the next save of ``final``.
    """
    make_output_dir(final.parent)
    cleanup_stale_temps(final, STATE_TEMP_SUFFIX)
    cleanup_stale_temps(final, ".old")
    try:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=STATE_TEMP_SUFFIX, dir=final.parent))
    except PermissionError:
        raise ConfigError(
            f"output_dir {str(final.parent)!r} is not writable; choose another folder or fix its permissions"
        ) from None


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp``; an old ``final`` is removed only afterwards."""
    for child in tmp.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".old", dir=final.parent))
        old.rmdir()  # only the unique name is wanted: the old folder is renamed onto it
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_write_bytes", "commit_dir", "make_output_dir", "temp_dir_for"]
