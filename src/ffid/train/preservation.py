"""Preservation in ``ffid train``: the run's :class:`~ffid.preserve.Preserver` from its config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..preserve import Preservable, Preserver, PreserveSettings, Projector, protected_prompts
from .config import TrainConfig
from .task import Task


def trained_prompts(task: Task, dataset: Any) -> list[str]:
    """The prompts/captions of this run's own data (not rehearsal), as the task reports them."""
    fn = getattr(task, "trained_prompts", None)
    return [p for p in fn(dataset) if p] if callable(fn) else []


def stored_text(
    cfg: TrainConfig, task: Task, dataset: Any, prompts: list[str]
) -> Callable[[], dict[str, torch.Tensor]] | None:
    """What each delta of the run stores as its prompts' text encodings (``store_encodings``):
    a reader of the encodings of the first 64 recorded prompts (captions, then trigger words)
    that the task finds in the run's own cache, or None when it stores none. The locations are
    fixed now; the tensors are read at each save, so training holds none of them."""
    fn = getattr(task, "stored_text", None)
    if not cfg.store_encodings or not callable(fn):
        return None
    from .cache import read_text_encodings

    where = fn([*prompts, *cfg.trigger_words], dataset)
    if not where:
        return None
    return lambda: read_text_encodings(where)


def _off_line(cfg: TrainConfig) -> str | None:
    """The summary line of a run without preservation, or None when it preserves (either method):
    ``preserve = auto`` turns it on for runs on top of ``base_deltas`` or ``preserve_deltas``."""
    if cfg.preserve == "off" or (cfg.preserve == "auto" and not cfg.earlier_deltas):
        why = "preserve = off" if cfg.preserve == "off" else "no base_deltas or preserve_deltas"
        return f"  preservation: off ({why})"
    return None


def make_preserver(cfg: TrainConfig, task: Task, handle: Any, dataset: Any) -> tuple[Preserver | None, str]:
    """The run's loss-method :class:`Preserver` (or None) and a line for the start-up summary;
    ``preserve_method = 'projection'`` is made by :func:`make_projector` instead.

    ``preserve = auto`` turns it on for runs on top of ``base_deltas``; every bad setting is
    refused here, before anything is written.
    """
    off = _off_line(cfg)
    if off:
        return None, off
    if cfg.preserve_method == "projection":
        return None, ""  # made by make_projector once the optimizer exists
    if not isinstance(task, Preservable):
        if cfg.preserve == "on":
            raise ConfigError(
                f"preserve = on, but task {task.name!r} does not support preservation (it lacks "
                "preservation_batch/preservation_outputs/preservation_distance); set preserve = 'off'"
            )
        return None, f"  preservation: off (task {task.name!r} does not support it)"
    protected, notes = _protected(cfg, task, dataset)
    items = cfg.preserve_items or max(1, cfg.batch_size // 4)
    preserver = Preserver(
        handle, task, protected, PreserveSettings(cfg.preserve_weight, items, cfg.preserve_every)
    )
    return preserver, "\n".join([preserver.describe(), *(f"  preservation: {n}" for n in notes)])


def _protected(cfg: TrainConfig, task: Task, dataset: Any) -> tuple[list[Any], list[str]]:
    """The protected prompts of the run (both methods protect the same set) and notes for the log."""
    regularisation: list[str] = []
    if cfg.preserve_regularisation and callable(getattr(task, "regularisation_prompts", None)):
        regularisation = list(task.regularisation_prompts(dataset))  # type: ignore[attr-defined]
    protected = protected_prompts(
        cfg.earlier_deltas,
        empty=cfg.preserve_empty,
        regularisation=regularisation,
        extra=cfg.preserve_prompts,
    )
    notes: list[str] = []
    prepare = getattr(task, "prepare_preservation", None)
    if callable(prepare):
        # e.g. the wan task finds each prompt's text encoding in the caches (or refuses)
        protected, notes = prepare(protected, cfg, dataset)
    return protected, notes


def make_projector(
    cfg: TrainConfig,
    task: Task,
    handle: Any,
    dataset: Any,
    model: Any,
    optimizer: torch.optim.Optimizer,
    device: Any = None,
    autocast: Any = None,
) -> tuple[Projector | None, str]:
    """``preserve_method = 'projection'``: the feature pass (refused here, before anything is
    written, when it leaves no free direction), then the optimizer hooked to project every step.

    The feature pass draws from a generator of its own, seeded by the run's seed, so the training
    stream is the same with and without it and a resumed run rebuilds the same bases."""
    off = _off_line(cfg)
    if off:
        return None, off
    if cfg.preserve_method != "projection":
        return None, ""
    protected, notes = _protected(cfg, task, dataset)
    projector = Projector(handle, task, protected, cfg.projection_settings())
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + 104729)
    kw = {"autocast": autocast} if autocast is not None else {}
    projector.collect(model, generator, device=device, **kw)
    projector.install(optimizer)
    return projector, "\n".join([projector.describe(), *(f"  preservation: {n}" for n in notes)])
