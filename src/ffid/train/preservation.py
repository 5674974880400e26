"""Preservation in ``ffid train``: the run's :class:`~ffid.preserve.Preserver` from its config."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..preserve import Preservable, Preserver, PreserveSettings, protected_prompts
from .config import TrainConfig
from .task import Task


def trained_prompts(task: Task, dataset: Any) -> list[str]:
    """The prompts/captions of this run's own data (not rehearsal), as the task reports them."""
    fn = getattr(task, "trained_prompts", None)
    return [p for p in fn(dataset) if p] if callable(fn) else []


def make_preserver(cfg: TrainConfig, task: Task, handle: Any, dataset: Any) -> tuple[Preserver | None, str]:
    """The run's :class:`Preserver` (or None) and a line for the start-up summary.

    ``preserve = auto`` turns it on for runs on top of ``base_deltas``; every bad setting is
    refused here, before anything is written.
    """
    if cfg.preserve == "off" or (cfg.preserve == "auto" and not cfg.base_deltas):
        why = "preserve = off" if cfg.preserve == "off" else "no base_deltas"
        return None, f"  preservation: off ({why})"
    if not isinstance(task, Preservable):
        if cfg.preserve == "on":
            raise ConfigError(
                f"preserve = on, but task {task.name!r} does not support preservation (it lacks "
                "preservation_batch/preservation_outputs/preservation_distance); set preserve = 'off'"
            )
        return None, f"  preservation: off (task {task.name!r} does not support it)"
    regularisation: list[str] = []
    if cfg.preserve_regularisation and callable(getattr(task, "regularisation_prompts", None)):
        regularisation = list(task.regularisation_prompts(dataset))  # type: ignore[attr-defined]
    protected = protected_prompts(
        cfg.base_deltas, empty=cfg.preserve_empty, regularisation=regularisation, extra=cfg.preserve_prompts
    )
    notes: list[str] = []
    prepare = getattr(task, "prepare_preservation", None)
    if callable(prepare):
        # e.g. the wan task finds each prompt's text encoding in the caches (or refuses)
        protected, notes = prepare(protected, cfg, dataset)
    items = cfg.preserve_items or max(1, cfg.batch_size // 4)
    preserver = Preserver(
        handle, task, protected, PreserveSettings(cfg.preserve_weight, items, cfg.preserve_every)
    )
    return preserver, "\n".join([preserver.describe(), *(f"  preservation: {n}" for n in notes)])
