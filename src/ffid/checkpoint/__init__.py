"""Checkpoints: sparse delta files, streaming full saves, merge / extract / inspect, atomic writes.

Public entry points:

- :func:`save_delta` / :func:`save_full`: what an engine handle trained, as a small delta or a
  whole model (``handle.save_delta`` / ``handle.save_full`` delegate here).
- :func:`load_delta` / :func:`apply_delta`: read a delta; write it into any ``nn.Module``.
- :func:`delta_file_size`: the bytes a delta of a selection takes, before training (no torch).
- :func:`merge_checkpoint` / :func:`extract_delta`: file to file, streaming (``ffid merge`` /
  ``ffid extract``).
- :func:`inspect_file`: what a delta or checkpoint holds (``ffid inspect``).
- :func:`write_safetensors_stream` / :func:`atomic_write`: the writers everything above uses.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Exported name -> submodule. Loaded on first use: `ffid merge` then never imports torch
# (its same-dtype path is numpy only), which saves seconds per run on a busy machine.
_EXPORTS = {
    "DiskSpaceError": "atomic", "atomic_write": "atomic", "cleanup_stale_temps": "atomic",
    "ApplyResult": "delta", "Delta": "delta", "DeltaFile": "delta", "DeltaInfo": "delta",
    "DeltaTensor": "delta", "apply_delta": "delta", "delta_file_size": "delta", "load_delta": "delta",
    "save_delta": "delta",
    "ExtractResult": "extract", "extract_delta": "extract",
    "save_full": "full",
    "format_inspect": "inspect", "inspect_file": "inspect",
    "MergeResult": "merge", "merge_checkpoint": "merge",
    "detect_naming": "namemap", "map_name": "namemap",
    "SafetensorsFile": "stio", "write_safetensors_stream": "stio",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
    "delta_file_size",
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
