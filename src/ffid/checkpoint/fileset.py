"""Sharded outputs switched as a set: a kill at any point leaves the old set or the new one readable.

The index is the one file that makes a set readable (``find_checkpoint`` finds the set by it), so
the switch is a single atomic rename of the index, and every shard it names must already be in
place, complete, before that rename. The old index names the old shards, so a new shard cannot
take an old shard's name until the switch is done: new shards are renamed in under a free
variant of their name (``model-00001-of-00002.1.safetensors``), the new index naming them is
renamed over the old one, and only then are the old shards removed. The final names are then
restored without a window: each variant is hard-linked to its plain name and a second index
naming the plain names is switched in the same way. Where the filesystem has no hard links
the set keeps the variant names, which every safetensors loader reads through the index.

A kill leaves at most unreferenced files: temps (removed by the next write of the same
target) and shards no index names, which the next commit of the set removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .atomic import TEMP_SUFFIX, fsync_dir, same_file, temp_prefix, write_bytes_atomic

# How many name variants one shard may take; two are used in turn, the rest cover hand-made sets.
_VARIANTS = 8


def variant_name(name: str, n: int) -> str:
    """The ``n``-th name a shard called ``name`` may take while an old set still uses ``name``."""
    if n == 0:
        return name
    p = Path(name)
    return f"{p.stem}.{n}{p.suffix}"


def _referenced(index: Path) -> set[str]:
    """Shard names the index at ``index`` names (empty when it is missing or unreadable).

    Read leniently: an index no reader accepts makes no set readable, so nothing it names needs
    keeping; names that are not plain file names are ignored (never removed, never replaced).
    """
    try:
        if not stat.S_ISREG(index.lstat().st_mode):
            return set()
        data = json.loads(index.read_bytes())
    except (OSError, ValueError):
        return set()
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return set()
    return {
        s
        for s in weight_map.values()
        if isinstance(s, str) and s not in ("", ".", "..") and Path(s).name == s and "\\" not in s
    }


def index_bytes(index: dict[str, Any], names: dict[str, str] | None = None) -> bytes:
    """The index as written (``indent=2``, one trailing newline), its shard names mapped by ``names``."""
    out = dict(index)
    if names:
        out["weight_map"] = {k: names.get(v, v) for k, v in index["weight_map"].items()}
    return (json.dumps(out, indent=2) + "\n").encode()


class FileSet:
    """Several files that make one output (shards plus their index), switched as a set.

    Each shard is written completely to its own temp (``atomic_write(..., pending=set)``);
    :meth:`commit` then switches the set as the module docstring describes. ``keep`` lists
    paths (the inputs) that are never replaced or removed. Use as a context manager: leaving it
    without :meth:`commit` removes the temps and leaves the old set as it was.
    """

    def __init__(self, index: Path, keep: Iterable[Path] = ()):
        self.index = Path(index)
        self.folder = self.index.parent
        self.keep = [Path(p) for p in keep]
        self.files: list[tuple[Path, Path]] = []

    def add(self, tmp: Path, target: Path) -> None:
        """Register the finished temp ``tmp`` of shard ``target`` (renamed only by :meth:`commit`)."""
        self.files.append((tmp, target))

    def _usable(self, name: str, taken: set[str]) -> bool:
        path = self.folder / name
        if name in taken or any(same_file(path, k) for k in self.keep):
            return False
        try:
            return stat.S_ISREG(path.lstat().st_mode)
        except FileNotFoundError:
            return True

    def _free_name(self, name: str, taken: set[str]) -> str:
        for n in range(_VARIANTS):
            candidate = variant_name(name, n)
            if self._usable(candidate, taken):
                return candidate
        raise ModelFileError(
            f"{self.folder} already holds {_VARIANTS} files named like shard {name!r} that cannot be "
            "replaced; write the set to an empty folder with -o"
        )

    def _remove(self, names: Iterable[str]) -> None:
        for name in names:
            path = self.folder / name
            if any(same_file(path, k) for k in self.keep):
                continue
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(path.lstat().st_mode):
                    os.unlink(path)

    def commit(self, index: dict[str, Any]) -> int:
        """Switch to the new set described by ``index``; returns the bytes of the index written.

        ``index["weight_map"]`` names the shards by their plain names (the targets given to
        :meth:`add`); the names actually used are substituted here.
        """
        old = _referenced(self.index)
        used: dict[str, str] = {}
        for tmp, target in self.files:
            name = self._free_name(target.name, old | set(used.values()))
            os.replace(tmp, self.folder / name)
            used[target.name] = name
        self.files = []
        fsync_dir(self.folder)
        written = write_bytes_atomic(self.index, index_bytes(index, used))  # the switch
        self._remove(old - set(used.values()))
        fsync_dir(self.folder)
        if any(plain != name for plain, name in used.items()):
            written = self._plain_names(index, used) or written
        live = _referenced(self.index)  # strays of killed commits: any variant the live index does not name
        strays = {variant_name(plain, n) for plain in used for n in range(_VARIANTS)}
        self._remove(strays - live)
        return written

    def _plain_names(self, index: dict[str, Any], used: dict[str, str]) -> int:
        """Give the live set its plain shard names (a second switch); 0 where hard links fail."""
        linked = []
        try:
            for plain, name in used.items():
                if plain == name:
                    continue
                target = self.folder / plain
                tmp = self.folder / f"{temp_prefix(target)}{secrets.token_hex(4)}{TEMP_SUFFIX}"
                os.link(self.folder / name, tmp)
                linked.append(tmp)
                os.replace(tmp, target)
        except OSError:  # no hard links here (FAT, some network filesystems): keep the variants
            for tmp in linked:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return 0
        fsync_dir(self.folder)
        return write_bytes_atomic(self.index, index_bytes(index))

    def __enter__(self) -> FileSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for tmp, _ in self.files:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.files = []


__all__ = ["FileSet", "index_bytes", "variant_name"]
