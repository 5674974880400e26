"""ffid: selective full finetuning of an exact, deterministic, disjoint fraction of a model's weights."""

from __future__ import annotations

from ._version import __version__
from .errors import (
    AttachError,
    CapacityError,
    ConfigError,
    FfidError,
    MismatchError,
    ModelFileError,
    TrainingError,
)
from .manifest import Manifest, TensorInfo
from .models import load_manifest
from .select import plan
from .selection import Selection, TensorPick, overlap

# Checkpoint functions import torch; load them on first use so `import ffid` stays light.
_CHECKPOINT_EXPORTS = (
    "apply_delta",
    "attach",
    "extract_delta",
    "load_delta",
    "merge_checkpoint",
    "save_delta",
    "save_full",
)


_ENGINE_EXPORTS = ("attach", "FfidHandle")


def __getattr__(name: str) -> object:
    if name in _ENGINE_EXPORTS:
        from . import engine

        return getattr(engine, name)
    if name in _CHECKPOINT_EXPORTS:
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'ffid' has no attribute {name!r}")


__all__ = [
    "AttachError",
    "CapacityError",
    "ConfigError",
    "FfidError",
    "FfidHandle",
    "Manifest",
    "MismatchError",
    "ModelFileError",
    "Selection",
    "TensorInfo",
    "TensorPick",
    "TrainingError",
    "__version__",
    "apply_delta",
    "attach",
    "extract_delta",
    "load_delta",
    "load_manifest",
    "merge_checkpoint",
    "overlap",
    "plan",
    "save_delta",
    "save_full",
]
