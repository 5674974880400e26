"""The trainer behind ``ffid train``: config, tasks (wan, causal-lm, demo), loop, states."""

from __future__ import annotations

from .config import TrainConfig, config_from_mapping, load_config
from .task import Task, get_task
from .trainer import TrainResult, train

__all__ = ["Task", "TrainConfig", "TrainResult", "config_from_mapping", "get_task", "load_config", "train"]
