"""Checkpoints: sparse delta files, streaming full saves, merge / extract / inspect, atomic writes.

Public entry points:

- :func:`save_delta` / :func:`save_full`: what an engine handle trained, as a small delta or a
  whole model (``handle.save_delta`` / ``handle.save_full`` delegate here).
- :func:`load_delta` / :func:`apply_delta`: read a delta; write it into any ``nn.Module``.
- :func:`merge_checkpoint` / :func:`extract_delta`: file to file, streaming (``ffid merge`` /
  ``ffid extract``).
- :func:`inspect_file`: what a delta or checkpoint holds (``ffid inspect``).
- :func:`write_safetensors_stream` / :func:`atomic_write`: the writers everything above uses.
"""

from __future__ import annotations

from .atomic import DiskSpaceError, atomic_write, cleanup_stale_temps
from .delta import (
    ApplyResult,
    Delta,
    DeltaFile,
    DeltaInfo,
    DeltaTensor,
    apply_delta,
    load_delta,
    save_delta,
)
from .extract import ExtractResult, extract_delta
from .full import save_full
from .inspect import format_inspect, inspect_file
from .merge import MergeResult, merge_checkpoint
from .namemap import detect_naming, map_name
from .stio import SafetensorsFile, write_safetensors_stream

__all__ = [
    "ApplyResult",
    "Delta",
    "DeltaFile",
    "DeltaInfo",
    "DeltaTensor",
    "DiskSpaceError",
    "ExtractResult",
    "MergeResult",
    "SafetensorsFile",
    "apply_delta",
    "atomic_write",
    "cleanup_stale_temps",
    "detect_naming",
    "extract_delta",
    "format_inspect",
    "inspect_file",
    "load_delta",
    "map_name",
    "merge_checkpoint",
    "save_delta",
    "save_full",
    "write_safetensors_stream",
]
