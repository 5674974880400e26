"""Atomic writes of the trainer's own small files and of whole state folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..checkpoint.atomic import write_bytes_atomic


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :mod:`ffid.checkpoint.atomic`), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data)


def temp_dir_for(final: Path) -> Path:
    """A fresh temp folder next to ``final`` (same file system, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def commit_dir(tmp: Path, final: Path) -> None:
    """Replace ``final`` by the finished folder ``tmp``; an old ``final`` is removed only afterwards."""
    for child in tmp.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = ["atomic_write_bytes", "commit_dir", "temp_dir_for"]
