"""Atomic file writes: a killed or failing writer leaves either the old file or the complete new one.

Every file ffid writes goes to a temporary file in the target folder (same filesystem, so the
final ``os.replace`` is atomic), is flushed and fsynced, then renamed over the target and the
folder entry fsynced. A writer killed with SIGKILL cannot clean up after itself, so temp names
carry the writer's pid (plus a random part; created with ``O_EXCL``, so never a planted file or
symlink) and the next write to the same target removes this user's temps of dead writers. A
replaced file keeps its mode; non-regular targets (devices, FIFOs) are refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    from .fileset import FileSet

TEMP_SUFFIX = ".ffid-tmp"
# Headroom kept free beyond the file itself, so writing never fills the disk to the last byte.
_SPACE_MARGIN = 64 * 1024 * 1024


class DiskSpaceError(ModelFileError):
    """The target folder has not enough free space for the file about to be written."""


def temp_prefix(target: Path, pid: int | None = None) -> str:
    """Start of the names of the temp files used while writing ``target`` (hidden, tagged with a pid).

    The rest of the name is random and the file is created with ``O_EXCL`` (``tempfile.mkstemp``),
    so a file or symlink planted under a guessed name is never opened, let alone followed.
    """
    return f".{target.name}.{pid or os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _dead_writer_pid(name: str, prefix: str, suffix: str) -> int | None:
    """The pid in a temp name ``{prefix}{pid}.{random}{suffix}`` when that writer no longer runs."""
    if not (name.startswith(prefix) and name.endswith(suffix)):
        return None
    pid_text = name[len(prefix) : -len(suffix)].split(".", 1)[0]
    if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
        return None
    return int(pid_text)


def stale_temps(target: Path, suffix: str = TEMP_SUFFIX) -> list[Path]:
    """Temps this user left next to ``target`` from writers that no longer run (killed mid-write).

    Only entries owned by the current user and not symlinks are listed: ffid cleans its own
    leftovers, never another user's files or what a link points to.
    """
    prefix = f".{target.name}."
    found: list[Path] = []
    if not target.parent.is_dir():
        return found
    uid = os.getuid() if hasattr(os, "getuid") else None
    for p in target.parent.iterdir():
        if _dead_writer_pid(p.name, prefix, suffix) is None:
            continue
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or (uid is not None and st.st_uid != uid):
            continue
        found.append(p)
    return found


def cleanup_stale_temps(target: Path, suffix: str = TEMP_SUFFIX) -> list[Path]:
    """Remove temps (files or folders) of dead writers of ``target``; returns what was removed."""
    removed = []
    for p in stale_temps(target, suffix):
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def space_margin(size: int) -> int:
    """Headroom kept free beyond a file of ``size`` bytes: 1/8 of it plus 1 MiB, at most 64 MiB."""
    return min(_SPACE_MARGIN, size // 8 + 2**20)


def check_free_space(folder: Path, size: int) -> None:
    """Raise :class:`DiskSpaceError` when ``folder`` cannot hold ``size`` more bytes (plus a margin)."""
    free = shutil.disk_usage(folder).free
    margin = space_margin(size)
    if size + margin > free:
        raise DiskSpaceError(
            f"{folder} has {_human(free)} free but the file needs {_human(size)} (+{_human(margin)} "
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


def fsync_dir(folder: Path) -> None:
    """Make the renames and removals in ``folder`` durable (best effort where a filesystem refuses)."""
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


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def check_target(target: Path) -> int | None:
    """Refuse an output path ffid must not replace; returns the mode of an existing file (else None).

    Folders and non-regular files (``/dev/full``, a FIFO, a socket) are refused: replacing them by
    a regular file is never what the user meant.
    """
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"output {target} cannot be checked ({exc.strerror}); choose another -o path"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"output {target} is a folder; give a file name such as {target / 'model.safetensors'}"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(
            f"output {target} is not a regular file (a device, pipe or socket); ffid only replaces regular "
            "files: choose a file path with -o"
        )
    return stat.S_IMODE(st.st_mode)


@contextlib.contextmanager
def atomic_write(
    target: str | os.PathLike[str], size: int | None = None, *, pending: FileSet | None = None
) -> Iterator[BinaryIO]:
    """Open a temp file for writing ``target``; on success it is fsynced and renamed over ``target``.

    ``size`` (when known) is checked against the free space first. On any exception the temp
    file is removed and ``target`` is untouched. A disk that fills up anyway gives a
    :class:`DiskSpaceError`. With ``pending`` the finished temp is not renamed but handed to
    that :class:`FileSet`, which switches all its files at once.
    """
    target = Path(target)
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it first or choose another -o path")
    mode = check_target(target)
    cleanup_stale_temps(target)
    if size is not None:
        check_free_space(folder, size)
    try:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(target), suffix=TEMP_SUFFIX, dir=folder)
    except PermissionError:
        raise ConfigError(
            f"output folder {folder} is not writable; choose another -o path or fix its permissions"
        ) from None
    tmp = Path(name)
    # The new file keeps the mode of the one it replaces (a 0600 output stays 0600); a new file
    # gets the usual mode for this umask instead of mkstemp's 0600.
    os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())
    # Unbuffered (kernel-side copies and our writes share one file offset) and readable (for mmap).
    f = open(fd, "w+b", buffering=0)  # noqa: SIM115 - closed in every branch below
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if pending is not None:
            pending.add(tmp, target)
        else:
            os.replace(tmp, target)
            fsync_dir(folder)
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
