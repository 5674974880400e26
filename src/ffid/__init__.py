"""ffid: selective full finetuning of an exact, deterministic, disjoint fraction of a model's weights."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    AttachError,
    CapacityError,
    ConfigError,
    FfidError,
    MismatchError,
    ModelFileError,
    TrainingError,
)
from .manifest import Manifest, TensorInfo, load_manifest
from .select import plan
from .selection import Selection, TensorPick, overlap

__all__ = [
    "AttachError",
    "CapacityError",
    "ConfigError",
    "FfidError",
    "Manifest",
    "MismatchError",
    "ModelFileError",
    "Selection",
    "TensorInfo",
    "TensorPick",
    "TrainingError",
    "__version__",
    "load_manifest",
    "overlap",
    "plan",
]
