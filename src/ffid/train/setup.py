"""Small set-up helpers of the training recipe: processes and devices, checkpointing, resume folder,
step count and buckets. Each is one decision the recipe (:mod:`ffid.train.trainer`) names."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import TrainConfig
from .data import BatchOrder
from .state import latest_state

DEFAULT_MAX_STEPS = 1600  # kohya's default when neither steps nor epochs are given


def make_accelerator(cfg: TrainConfig) -> Any:
    """An ``accelerate.Accelerator`` for ``cfg.mixed_precision`` (one gloo group on CPU-only runs)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        # accelerate keeps one process-wide state; a second run in the same process (tests, the
        # demo's two stages) may want another mixed precision, which needs a fresh state.
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    try:
        # Without cpu=True, accelerate treats a multi-process launch on a machine with no GPU as
        # one process per copy (each would train alone and write the same files); with it, the
        # processes form a gloo group like they form an NCCL one on GPUs.
        cpu = world > 1 and not torch.cuda.is_available()
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"mixed_precision {cfg.mixed_precision!r} is not usable here: {exc}") from None


def enable_checkpointing(model: nn.Module) -> None:
    """Turn on the model's own gradient checkpointing (transformers or diffusers switch)."""
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    else:
        raise ConfigError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient checkpointing switch; "
            "turn the key off"
        )


def place(model: nn.Module, device: torch.device, keep: list[nn.Module]) -> None:
    """Move the model to ``device`` except the modules in ``keep`` (blocks parked by block swap)."""
    skip = {id(t) for m in keep for t in [*m.parameters(), *m.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and t.device != device:
            t.data = t.data.to(device)


def resume_folder(cfg: TrainConfig) -> Path | None:
    """The state folder ``cfg.resume`` names (``latest``: the newest in ``output_dir``), or None."""
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = latest_state(Path(cfg.output_dir), cfg.output_name)
        if found is None:
            raise ConfigError(
                f"resume = 'latest' but {cfg.output_dir!r} holds no '{cfg.output_name}*-state' "
                "folder; train with save_state = true first or name a state folder"
            )
        return found
    return Path(cfg.resume)


def total_steps(cfg: TrainConfig, order: BatchOrder) -> int:
    """Optimizer steps of the run (``max_train_epochs`` wins over ``max_train_steps``)."""
    if cfg.max_train_epochs:
        return max(
            1, math.ceil(cfg.max_train_epochs * order.batches_per_epoch / cfg.gradient_accumulation_steps)
        )
    return cfg.max_train_steps or DEFAULT_MAX_STEPS


def buckets(parts: list[Any]) -> tuple[int, ...] | None:
    """A bucket id per item when the datasets tell item shapes (``bucket_keys``) and they differ:
    batches then never mix shapes. ``None`` when there is one shape or the datasets do not say."""
    keys: list[Any] = []
    for part in parts:
        part_keys = getattr(part, "bucket_keys", None)
        if part_keys is None:
            return None
        keys.extend(part_keys)
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        return None
    ids = {k: i for i, k in enumerate(distinct)}
    return tuple(ids[k] for k in keys)
