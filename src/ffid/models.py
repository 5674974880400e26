"""Whatever names "the model", resolved to a :class:`~ffid.manifest.Manifest`.

One dispatcher for every entry point (plan, estimate, overlap, inspect of a delta's selection):
an ``nn.Module``, a Manifest, a ``.safetensors`` file, a sharded index, a diffusers/transformers
folder or a built-in preset name. It sits above both :mod:`ffid.manifest` (the readers) and
:mod:`ffid.presets` (built-in shapes, made of manifest types), so neither imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingFileError
from .manifest import (
    Manifest,
    find_checkpoint,
    manifest_from_index,
    manifest_from_module,
    manifest_from_safetensors,
)
from .presets import PRESETS, preset_manifest


def load_manifest(
    source: Any,
    block_pattern: str | None = None,
) -> Manifest:
    """Make a :class:`Manifest` from a module, a manifest, a path (file/index/folder) or a preset name."""
    if isinstance(source, Manifest):
        if block_pattern is None:
            return source
        return Manifest(source.tensors, source.source, block_pattern, source.metadata)
    if not isinstance(source, (str, os.PathLike)):
        # torch is imported only here: planning from a file or preset must not pay its import time.
        import torch

        if isinstance(source, torch.nn.Module):
            return manifest_from_module(source, block_pattern)
        raise ConfigError(
            f"cannot read a model from a {type(source).__name__}; pass an nn.Module, a .safetensors path, "
            "a model folder or a preset name"
        )
    text = os.fspath(source)
    if text in PRESETS:
        m = preset_manifest(text)
        return m if block_pattern is None else Manifest(m.tensors, m.source, block_pattern, m.metadata)
    path = Path(text)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.name.endswith(".index.json"):
        return manifest_from_index(path, block_pattern)
    if not path.exists():
        names = ", ".join(sorted(PRESETS))
        raise MissingFileError(
            f"{text!r} is neither an existing file or folder nor a preset;"
            f" check the path or use one of: {names}"
        )
    return manifest_from_safetensors(path, block_pattern)
