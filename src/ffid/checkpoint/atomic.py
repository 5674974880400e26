"""Atomic file writes: a killed or failing writer leaves either the old file or the complete new one.

Every file ffid writes goes to a temporary file in the target folder (same filesystem, so the
final ``os.replace`` is atomic), is flushed and fsynced, then renamed over the target and the
folder entry fsynced. A writer killed with SIGKILL cannot clean up after itself, so temp names
carry the writer's pid and the next write to the same target removes temps of dead writers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, ModelFileError

TEMP_SUFFIX = ".ffid-tmp"
# Headroom kept free beyond the file itself, so writing never fills the disk to the last byte.
_SPACE_MARGIN = 64 * 1024 * 1024


class DiskSpaceError(ModelFileError):
    """The target folder has not enough free space for the file about to be written."""


def temp_path_for(target: Path, pid: int | None = None) -> Path:
    """The temp file used while writing ``target`` (hidden, in the same folder, tagged with the pid)."""
    return target.parent / f".{target.name}.{pid or os.getpid()}{TEMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temps(target: Path) -> list[Path]:
    """Temp files left next to ``target`` by writers that no longer run (killed mid-write)."""
    prefix = f".{target.name}."
    found = []
    if not target.parent.is_dir():
        return found
    for p in target.parent.iterdir():
        name = p.name
        if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
            continue
        pid_text = name[len(prefix) : -len(TEMP_SUFFIX)]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            found.append(p)
    return found


def cleanup_stale_temps(target: Path) -> list[Path]:
    """Remove temp files of dead writers of ``target``; returns what was removed."""
    removed = []
    for p in stale_temps(target):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def check_free_space(folder: Path, size: int) -> None:
    """Raise :class:`DiskSpaceError` when ``folder`` cannot hold ``size`` more bytes (plus a margin)."""
    free = shutil.disk_usage(folder).free
    if size + _SPACE_MARGIN > free:
        raise DiskSpaceError(
            f"{folder} has {free / 2**30:.2f} GiB free but the file needs {size / 2**30:.2f} GiB (+64 MiB "
            "margin); free some space or write to another folder with -o"
        )


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name the same file (resolving links), False if either is missing."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_overwrite(target: Path, inputs: Iterable[Path]) -> None:
    """Refuse to write ``target`` when it is one of the ``inputs`` (it would corrupt what is read)."""
    for src in inputs:
        if same_file(target, src):
            raise ConfigError(
                f"output {target} is also an input ({src}); writing it would destroy the data being read: "
                "choose another output path with -o"
            )


def _fsync_dir(folder: Path) -> None:
    # A rename is durable only once the folder entry is on disk; some filesystems refuse O_RDONLY dirs.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], size: int | None = None) -> Iterator[BinaryIO]:
    """Open a temp file for writing ``target``; on success it is fsynced and renamed over ``target``.

    ``size`` (when known) is checked against the free space first. On any exception the temp
    file is removed and ``target`` is untouched. A disk that fills up anyway gives a
    :class:`DiskSpaceError`.
    """
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it first or choose another -o path")
    if target.is_dir():
        raise ConfigError(
            f"output {target} is a folder; give a file name such as {target / 'model.safetensors'}"
        )
    cleanup_stale_temps(target)
    if size is not None:
        check_free_space(folder, size)
    tmp = temp_path_for(target)
    # Unbuffered (kernel-side copies and our writes share one file offset) and readable (for mmap).
    f = open(tmp, "w+b", buffering=0)  # noqa: SIM115 - closed in every branch below
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
        _fsync_dir(folder)
    except BaseException as exc:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"the disk holding {folder} filled up while writing {target.name}; nothing was written, "
                "free some space or write elsewhere with -o"
            ) from None
        raise


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> int:
    """Write ``data`` to ``target`` atomically; returns the number of bytes."""
    with atomic_write(target, size=len(data)) as f:
        view = memoryview(data)
        while view:
            view = view[f.write(view) :]
    return len(data)
