"""A model checkpoint on disk: one ``.safetensors`` file or an index with shards, read tensor by tensor."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MissingFileError, ModelFileError
from ..manifest import find_checkpoint, read_index
from .stio import Entry, SafetensorsFile


@dataclass
class Located:
    """Where one tensor lives: the shard file and its entry."""

    file: SafetensorsFile
    entry: Entry


class Checkpoint:
    """A single-file or sharded safetensors checkpoint opened for streaming reads.

    ``path`` may be a ``.safetensors`` file, a ``*.safetensors.index.json`` or a diffusers /
    transformers model folder. Every shard header is validated on open, so a truncated or
    corrupt input is reported before anything is written.
    """

    def __init__(self, path: str | os.PathLike[str]):
        p = Path(path)
        if not p.exists():
            raise MissingFileError(f"{p}: no such file or folder; check the path")
        if p.is_dir():
            p = find_checkpoint(p)
        self.path = p
        self.index: dict[str, Any] | None = None
        self.shards: list[SafetensorsFile] = []
        if p.name.endswith(".index.json"):
            self.index, shard_paths = read_index(p)
            opened: dict[str, SafetensorsFile] = {}
            for shard in sorted(set(shard_paths.values())):
                opened[shard.name] = SafetensorsFile(shard)
            self.shards.extend(opened.values())
            for key, shard in shard_paths.items():
                if key not in opened[shard.name].entries:
                    raise ModelFileError(
                        f"{p} maps {key!r} to {shard.name}, which does not hold it; re-save the checkpoint"
                    )
        else:
            self.shards.append(SafetensorsFile(p))
        self.tensors: dict[str, Located] = {}
        for sf in self.shards:
            for name, entry in sf.by_canonical.items():
                if name in self.tensors:
                    raise ModelFileError(
                        f"{self.path}: tensor {name!r} is stored twice "
                        f"({self.tensors[name].file.path.name} and "
                        f"{sf.path.name}); re-save the checkpoint"
                    )
                self.tensors[name] = Located(sf, entry)

    @property
    def sharded(self) -> bool:
        return self.index is not None

    @property
    def files(self) -> list[Path]:
        """Every file that makes up the checkpoint (index first)."""
        return ([self.path] if self.sharded else []) + [s.path for s in self.shards]

    @property
    def metadata(self) -> dict[str, str]:
        if self.index is not None:
            return {str(k): str(v) for k, v in (self.index.get("metadata") or {}).items()}
        return dict(self.shards[0].metadata)

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
