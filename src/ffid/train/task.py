"""What the trainer needs from a kind of model: the :class:`Task` protocol and the task registry.

The trainer (:func:`ffid.train.trainer.train`) owns everything generic: selection, optimizer,
schedule, accumulation, clipping, mixed precision, saving, resume and logging. A task owns what
differs between model families: how the base model is built, what one data item is, how items
are batched and what the loss is. Built-in tasks: ``wan`` (flow matching on cached latents) and
``causal-lm`` (next-token loss on text).

Other tasks plug in without touching the trainer, in one of two ways:

- ``model_type = "package.module:factory"`` names a module attribute (a Task class, instance or
  factory; a bare module must expose ``make_task()`` or ``TASK``). That imports and runs code a
  config file names, so it needs the user's opt-in (``ffid train --allow_plugins`` or
  ``FFID_ALLOW_PLUGINS=1``, :mod:`ffid.train.plugins`);
- a distribution declares an entry point in the ``ffid.tasks`` group, e.g. in ``pyproject.toml``::

      [project.entry-points."ffid.tasks"]
      demo = "ffid.demo.task:make_task"

  and ``model_type = "demo"`` then finds it. ffid's own demo registers itself exactly so.

Optional task attributes the trainer reads: ``task_args_keys`` (the ``task_args`` it reads;
others are refused), ``rehearsal_refusal`` (why ``rehearsal_datasets`` do not apply, if so),
``trained_prompts``/``regularisation_prompts``/``prepare_preservation`` and the preservation
methods of :class:`ffid.preserve.Preservable`, and ``sample``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import ConfigError, did_you_mean
from .plugins import check_plugin

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from .config import TrainConfig


@runtime_checkable
class Task(Protocol):
    """A model family the trainer can train.

    ``loss`` is called inside the trainer's autocast context with a batch already on the
    model's device; it must draw all its randomness (noise, timesteps) from ``generator`` (a CPU
    ``torch.Generator`` the trainer seeds, saves and restores) so that a resumed run repeats
    the uninterrupted one exactly.

    Optional: ``sample(model, step, out_dir) -> None`` is called every ``sample_every_n_steps``
    steps (and at the end) with ``out_dir = {output_dir}/sample``.
    """

    name: str

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        """The base model (loaded or built), on the CPU, in eval mode or train mode as it needs."""
        ...

    def dataset(self, cfg: TrainConfig) -> Dataset:
        """The training items; each item is a ``dict[str, Tensor]``. Raise ConfigError when missing/empty."""
        ...

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack a list of items into one batch."""
        ...

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """A scalar loss for ``batch`` (mean over the batch)."""
        ...


def _wan() -> Task:
    from .wan import WanTask

    return WanTask()


def _causal_lm() -> Task:
    from .causal_lm import CausalLMTask

    return CausalLMTask()


TASKS: dict[str, Callable[[], Task]] = {"wan": _wan, "causal-lm": _causal_lm}
ENTRY_POINT_GROUP = "ffid.tasks"


def plugin_tasks() -> dict[str, Any]:
    """Tasks other distributions (and ffid's demo) register under the ``ffid.tasks`` entry point."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in TASKS}


def _instantiate(obj: Any, where: str) -> Task:
    """A Task from a module (``make_task()``/``TASK``/``Task`` class), a class or a factory."""
    import inspect

    if inspect.ismodule(obj):
        for attr in ("make_task", "TASK"):
            if hasattr(obj, attr):
                return _instantiate(getattr(obj, attr), f"{where}.{attr}")
        raise ConfigError(f"{where} defines no make_task() or TASK; expose one of them")
    task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    missing = [
        m for m in ("build_model", "dataset", "collate", "loss") if not callable(getattr(task, m, None))
    ]
    if missing:
        raise ConfigError(f"{where} is not a Task: it lacks {', '.join(missing)}; see ffid.train.task.Task")
    if not getattr(task, "name", None):
        task.name = where
    return task


def check_task_args(task: object, task_args: dict[str, Any]) -> None:
    """Refuse ``task_args`` keys the task does not read, when it says which it reads.

    A task lists its keys in an optional ``task_args_keys`` attribute (tasks without it accept
    anything); a misspelt key then fails with the nearest known one instead of being ignored.
    """
    known = getattr(task, "task_args_keys", None)
    if known is None:
        return
    unknown = sorted(k for k in task_args if k not in known)
    if unknown:
        hint = did_you_mean(unknown[0], sorted(known)).rstrip() or (
            f"it reads {', '.join(sorted(known))}" if known else "it reads no task_args"
        )
        raise ConfigError(
            f"task_args.{unknown[0]} is not a key of model_type {getattr(task, 'name', '?')!r}; {hint}"
        )


def get_task(model_type: str) -> Task:
    """The task for ``model_type``: a built-in name, an entry-point name or
    ``"package.module:attribute"`` (the last only with the plugin opt-in)."""
    if model_type in TASKS:
        return TASKS[model_type]()
    if ":" in model_type or (model_type.count(".") and not Path(model_type).exists()):
        check_plugin("model_type", model_type)  # before anything is imported
        module_name, _, attr = model_type.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"model_type {model_type!r}: cannot import {module_name!r} ({exc})") from None
        if not attr:
            return _instantiate(module, module_name)
        if not hasattr(module, attr):
            raise ConfigError(f"model_type {model_type!r}: {module_name} has no attribute {attr!r}")
        return _instantiate(getattr(module, attr), model_type)
    plugins = plugin_tasks()
    if model_type in plugins:
        try:
            factory = plugins[model_type].load()
        except ImportError as exc:
            raise ConfigError(
                f"model_type {model_type!r} is registered by {plugins[model_type].value!r}, which cannot "
                f"be imported ({exc}); install what it needs"
            ) from None
        return _instantiate(factory, plugins[model_type].value)
    known = [*TASKS, *plugins]
    raise ConfigError(
        f"unknown model_type {model_type!r}; {did_you_mean(model_type, known)}choose one of: "
        f"{', '.join(known)} or 'package.module:factory' (names registered under the "
        f"{ENTRY_POINT_GROUP!r} entry point, such as the demo's, need ffid installed: pip install -e .)"
    )


__all__ = ["ENTRY_POINT_GROUP", "TASKS", "Task", "check_task_args", "get_task", "plugin_tasks"]
