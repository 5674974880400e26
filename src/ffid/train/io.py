"""Atomic writes of the trainer's own small files and of whole state folders.

A state folder is switched by two renames (the live folder aside to ``.old``, the finished temp
into place), so a kill between them leaves the state only as ``.old``. That folder is complete;
:func:`recover_dir` puts it back, and every reader and the next save of the folder call it
before anything else, so such a state is never lost or deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..checkpoint.atomic import cleanup_stale_temps, fsync_dir, stale_temps, temp_prefix, write_bytes_atomic
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


# The longest name the trainer makes of ``output_name``: ``{name}-step00000000.safetensors`` (25
# more bytes) inside a temp name ``.{file}.{pid}.{random}.ffid-tmp`` (30 more with a 10-digit pid).
_NAME_OVERHEAD = 25 + 30


def _nearest_existing(folder: Path) -> Path:
    for p in [folder, *folder.parents]:
        if p.exists():
            return p
    return Path("/")


def check_output_dir(folder: Path, output_name: str) -> None:
    """Refuse, before anything is written, an output folder that could not take this run's files.

    Each folder name and the longest file name the run makes must fit the filesystem's limit, and
    the folder (or, while it does not exist, the nearest folder above it) must be a writable
    folder. A refusal late in the run would otherwise leave the folders made on the way.
    """
    base = _nearest_existing(folder)
    try:
        name_max = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    for part in folder.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"output_dir {str(folder)!r} has a folder name of {len(os.fsencode(part))} bytes, over this "
                f"filesystem's limit of {name_max}; choose a shorter output_dir"
            )
    room = name_max - _NAME_OVERHEAD
    if len(os.fsencode(output_name)) > room:
        raise ConfigError(
            f"output_name {output_name[:40]!r}... is {len(os.fsencode(output_name))} bytes; the files "
            f"made of it need {_NAME_OVERHEAD} more and this filesystem allows {name_max}: use at most "
            f"{room} bytes"
        )
    if not base.is_dir():
        where = "an existing file" if base == folder else f"inside {str(base)!r}, an existing file"
        raise ConfigError(f"output_dir {str(folder)!r} is {where}, not a folder; name a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir {str(folder)!r} cannot be written ({str(base)!r} is not writable); choose another "
            "folder or fix its permissions"
        )


STATE_TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
# ``.{final}.{pid}.{random}.old``: tempfile's random part has no dots, the final name may.
_OLD_NAME = re.compile(r"^\.(?P<final>.+)\.\d+\.[A-Za-z0-9_]+\.old$")


def recover_dir(final: Path) -> bool:
    """Rename back the old ``final`` that a commit killed between its two renames left aside.

    Only when ``final`` is missing and the writer that moved it aside is dead; returns True when
    a folder was put back.
    """
    if final.exists() or final.is_symlink():
        return False
    olds = [p for p in stale_temps(final, OLD_SUFFIX) if p.is_dir()]
    if not olds:
        return False
    newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
    os.replace(newest, final)
    fsync_dir(final.parent)
    return True


def recover_dirs(folder: Path) -> list[Path]:
    """:func:`recover_dir` for every folder aside in ``folder``; returns the folders put back."""
    found = []
    if not folder.is_dir():
        return found
    for p in folder.iterdir():
        m = _OLD_NAME.match(p.name)
        if m and recover_dir(folder / m["final"]):
            found.append(folder / m["final"])
    return found


def temp_dir_for(final: Path) -> Path:
    """A fresh temp folder next to ``final`` (same file system, so the rename is atomic).

    Its name carries this process's pid, so temp folders of killed trainers (and the ``.old``
    folder of a killed commit) are recognised and removed here, by the next save of ``final``.
    """
    make_output_dir(final.parent)
    recover_dir(final)  # before the cleanup, which would delete the only copy
    cleanup_stale_temps(final, STATE_TEMP_SUFFIX)
    cleanup_stale_temps(final, OLD_SUFFIX)
    try:
        return Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=STATE_TEMP_SUFFIX, dir=final.parent))
    except PermissionError:
        raise ConfigError(
            f"output_dir {str(final.parent)!r} is not writable; choose another folder or fix its permissions"
        ) from None


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp``; an old ``final`` is removed only afterwards.

    Between the two renames the old state exists only as ``.old``; :func:`recover_dir` restores it.
    """
    for child in tmp.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=OLD_SUFFIX, dir=final.parent))
        old.rmdir()  # only the unique name is wanted: the old folder is renamed onto it
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:  # a failed (not killed) switch puts the old state straight back
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "atomic_write_bytes",
    "check_output_dir",
    "commit_dir",
    "make_output_dir",
    "recover_dir",
    "recover_dirs",
    "temp_dir_for",
]
