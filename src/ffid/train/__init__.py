"""The trainer behind ``ffid train``: config, tasks (wan, causal-lm, demo), loop, states."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import TrainConfig, config_from_mapping, load_config

# task/trainer import torch: loaded on first use so that building the CLI parser (which imports
# ffid.train.config for its flags) stays torch-free and `ffid plan/estimate` answer in < 1 s.
_LAZY = {"Task": ".task", "get_task": ".task", "TrainResult": ".trainer", "train": ".trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Task", "TrainConfig", "TrainResult", "config_from_mapping", "get_task", "load_config", "train"]
