"""The demo's base: a fresh tiny Wan fully trained on the base digit classes, cached by recipe.

This is a loop of its own rather than :func:`ffid.train.train`, which cannot reproduce it: the
trainer trains a selected slice (``0 < ff <= 1``) of a model *file* through the ffid engine and
writes a delta, its warm-up starts at lr 0 (transformers' schedules) where this one starts at
``1 / warmup``, and its noise generator is seeded ``seed * 7919 + rank`` where this one uses
``+ 17``. Any of these changes the base and with it every demo number (and would need a
:data:`~.config.DEMO_VERSION` bump so no stale cached base is reused).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import DemoConfig
from .model import build_model, param_count
from .shipped import RECIPE_META, ShippedBaseMismatch, find_shipped, recipe_key
from .task import DemoTask, base_concepts, save_model


def pretrain(
    cfg: DemoConfig,
    out: Path,
    data: tuple[torch.Tensor, torch.Tensor],
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, list[float]]:
    """Full finetuning of a fresh tiny Wan on the base classes (a small dedicated loop).

    The ffid trainer trains a fraction of an existing model; pretraining trains every weight from
    scratch, which is ordinary full training, so it gets a plain AdamW loop. It shares the
    dataset, batching order and loss with :class:`DemoTask`, so base and characters learn the
    same objective.
    """
    from ..train.data import BatchOrder
    from ..train.monitor import TrainMonitor

    model = build_model(cfg.spec, seed=cfg.seed)
    model.train()
    task = DemoTask(base_concepts(cfg.held_out), spec=cfg.spec, data=data)
    dataset = task.dataset(None)  # type: ignore[arg-type]  # concepts given: cfg not read
    order = BatchOrder(len(dataset), cfg.pretrain_batch, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    monitor = TrainMonitor(
        cfg.pretrain_steps,
        0,
        [],
        logging_dir=str(Path(cfg.output_dir) / "logs" / "pretrain"),
        enabled=True,
        progress=cfg.progress,
    )
    log(
        f"pretraining the base: {param_count(model):,} params (all trained), {len(dataset)} real digit "
        f"scans of classes {', '.join(c.name for c in task.concepts or [])}, {cfg.pretrain_steps} steps "
        f"x batch {cfg.pretrain_batch}"
    )
    batches = order.iterate(0, 0)
    try:
        for step in range(1, cfg.pretrain_steps + 1):
            _, _, ids = next(batches)
            loss = task.loss(model, task.collate([dataset[i] for i in ids]), generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                from ..errors import TrainingError

                raise TrainingError(f"pretraining loss is {value} at step {step}; lower --pretrain_lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            monitor.step(step, value, scheduler.get_last_lr()[0])
    finally:
        monitor.close()
    model.eval()
    return model, monitor.losses


def load_or_pretrain(
    cfg: DemoConfig, data: tuple[torch.Tensor, torch.Tensor], log: Callable[[str], None]
) -> tuple[Path, list[float], bool]:
    """The base file, its pretraining losses, and whether it was read rather than pretrained now.

    In order: ``--fresh`` pretrains; else the base shipped with ffid for this recipe
    (:mod:`.shipped`, verified; one that fails a check is named in one line and skipped); else
    the cached one under ``cache_dir``; else it is pretrained and cached.
    """
    from ..train.io import atomic_write_bytes
    from ..train.monitor import plot_losses

    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "base"
    recipe = cfg.base_recipe()
    key = recipe_key(recipe)
    if not cfg.fresh:
        try:
            shipped = find_shipped(recipe)
        except ShippedBaseMismatch as exc:
            shipped = None
            log(f"base: the shipped base for recipe {key} is not used ({exc}); pretraining instead")
        if shipped is not None:
            log(f"base: shipped with ffid (recipe {key}; --fresh retrains it)")
            return shipped.path, list(shipped.info.get("losses", [])), True
    path = cache / f"base-{key}.safetensors"
    info_path = cache / f"base-{key}.json"
    if path.is_file() and info_path.is_file() and not cfg.fresh:
        info = json.loads(info_path.read_text())
        log(f"base: cached {path} (recipe {key}; --fresh retrains it)")
        return path, list(info.get("losses", [])), True
    t0 = time.perf_counter()
    model, losses = pretrain(cfg, cache, data, log)
    seconds = time.perf_counter() - t0
    save_model(model, cfg.spec, path, {RECIPE_META: json.dumps(recipe)})
    info = {"recipe": recipe, "key": key, "seconds": round(seconds, 2), "losses": losses}
    atomic_write_bytes(info_path, (json.dumps(info) + "\n").encode())
    plot_losses(losses, cache / f"base-{key}-loss.png", "pretraining the demo base")
    log(f"base: pretrained in {seconds:.0f} s, saved {path}")
    return path, losses, False
