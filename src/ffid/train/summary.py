"""What a run says about itself: the start-up summary and the metadata saved with each delta."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..estimate.optimizer import optimizer_state_bytes
from ..preserve import prompt_metadata
from .config import TrainConfig
from .data import BatchOrder
from .monitor import format_bytes, peak_memory
from .state import Position
from .task import Task

if TYPE_CHECKING:
    from ..selection import Selection


def delta_metadata(
    cfg: TrainConfig, task: Task, sel: Selection, step: int, epoch: int, prompts: list[str]
) -> dict[str, str]:
    """kohya ``ss_*`` training keys and the prompts this run trained (for later runs to protect);
    the checkpoint writer adds the selection and model-spec keys."""
    return {
        **prompt_metadata(prompts, cfg.trigger_words),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_optimizer": cfg.optimizer_type
        + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_batch_size": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_base_model_version": str(task.name),
        "ss_dataset": Path(cfg.dataset).name if cfg.dataset else "",
    }


def startup_summary(
    cfg: TrainConfig,
    task: Task,
    sel: Selection,
    *,
    n_items: int,
    order: BatchOrder,
    total: int,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    accelerator: Any,
    start: Position,
    swapped: int,
    n_rehearsal: int = 0,
) -> str:
    """The lines ``ffid train`` prints before the first step: data, steps, selection, memory, setup."""
    proxies = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    rehearsed = f" ({n_rehearsal} of them from rehearsal_datasets)" if n_rehearsal else ""
    base = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params = [p.shape for g in optimizer.param_groups for p in g["params"]]
    states = optimizer_state_bytes(cfg.optimizer_type, params, optimizer.defaults)
    epochs = total * cfg.gradient_accumulation_steps / order.batches_per_epoch
    lines = [
        f"ffid train: {task.name}  {sel.selector} ff={cfg.ff} ffid={cfg.ffid}  fingerprint {sel.fingerprint}",
        f"  items {n_items}{rehearsed}, batch {cfg.batch_size} x {accelerator.num_processes} process(es) x "
        f"{cfg.gradient_accumulation_steps} accumulation, {order.batches_per_epoch} micro-batches/epoch"
        + (f" from {len(set(order.groups))} buckets (one latent shape per batch)" if order.groups else ""),
        f"  steps {total} ({epochs:.2f} epochs)" + (f", resuming at step {start.step}" if start.step else ""),
        f"  trainable params {sel.selected:,} of {sel.total_params:,} "
        f"({sel.selected / sel.total_params:.4%}) in {len(sel)} tensors",
        f"  memory: base weights {format_bytes(base)}, trained values {format_bytes(proxies)}, "
        f"optimizer state {'unknown' if states is None else '~' + format_bytes(states)}; "
        f"{peak_memory(accelerator.device)} so far",
        f"  device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
        f"optimizer {cfg.optimizer_type}, lr {cfg.learning_rate} ({cfg.lr_scheduler}), checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, blocks swapped {swapped}",
    ]
    return "\n".join(lines)
