"""Optimizers and learning-rate schedules by name, as kohya-style trainers spell them."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, did_you_mean
from .config import TrainConfig, parse_kv_list
from .plugins import check_plugin

BUILTIN_OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "SGD", "Adam", "Lion8bit", "PagedAdamW8bit")


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    lowered = name.lower()
    if lowered == "adamw":
        return torch.optim.AdamW
    if lowered == "adam":
        return torch.optim.Adam
    if lowered == "sgd":
        return torch.optim.SGD
    if lowered in ("adamw8bit", "lion8bit", "pagedadamw8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(f"optimizer_type {name} needs bitsandbytes; pip install bitsandbytes") from None
        return {
            "adamw8bit": bnb.optim.AdamW8bit,
            "lion8bit": bnb.optim.Lion8bit,
            "pagedadamw8bit": bnb.optim.PagedAdamW8bit,
        }[lowered]
    if lowered == "adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError:
            raise ConfigError(
                "optimizer_type Adafactor needs transformers; pip install transformers"
            ) from None
        return Adafactor
    if "." in name or ":" in name:
        check_optimizer_type(name)
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            # torch's own optimizers are read from the already imported torch.optim
            module = torch.optim if module_name == "torch.optim" else importlib.import_module(module_name)
            cls = getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"optimizer_type {name!r} cannot be imported ({exc}); give 'package.module.Class'"
            ) from None
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
            raise ConfigError(f"optimizer_type {name!r} is not a torch.optim.Optimizer subclass")
        return cls
    raise ConfigError(
        f"unknown optimizer_type {name!r}; {did_you_mean(name, BUILTIN_OPTIMIZERS, cutoff=0.4)}"
        "choose one of: "
        f"{', '.join(BUILTIN_OPTIMIZERS)} or a dotted path such as torch.optim.RAdam"
    )


def check_optimizer_type(name: str) -> None:
    """Refuse a dotted ``optimizer_type`` outside ``torch.optim`` without the plugin opt-in
    (:mod:`ffid.train.plugins`): importing it runs code the config names. Needs no import, so
    ``ffid train`` calls it before loading anything."""
    if "." not in name and ":" not in name:
        return
    module_name, _, attr = name.replace(":", ".").rpartition(".")
    if module_name == "torch.optim" and attr.isidentifier():
        return
    check_plugin("optimizer_type", name)


def build_optimizer(cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by ``optimizer_type`` over ``params`` with ``optimizer_args``."""
    cls = _optimizer_class(cfg.optimizer_type)
    kwargs: dict[str, Any] = parse_kv_list(cfg.optimizer_args, "optimizer_args")
    if cls.__name__ == "Adafactor":
        # Adafactor's own default ignores lr and uses a relative step; an explicit lr needs these off.
        kwargs.setdefault("relative_step", False)
        kwargs.setdefault("scale_parameter", False)
        kwargs.setdefault("warmup_init", False)
    kwargs.setdefault("lr", cfg.learning_rate)
    try:
        return cls(list(params), **kwargs)
    except TypeError as exc:
        raise ConfigError(f"optimizer_args {cfg.optimizer_args} do not fit {cls.__name__}: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"optimizer {cls.__name__} refused its arguments: {exc}") from None


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The schedule named by ``lr_scheduler`` (transformers' get_scheduler), stepped per optimizer step."""
    name = cfg.lr_scheduler
    if name == "constant" and cfg.lr_warmup_steps:
        name = "constant_with_warmup"
    try:
        from transformers import get_scheduler
        from transformers.trainer_utils import SchedulerType
    except ImportError:  # pragma: no cover - transformers is in every extra that trains
        if name != "constant":
            raise ConfigError(f"lr_scheduler {name!r} needs transformers; pip install transformers") from None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    valid = [s.value for s in SchedulerType]
    if name not in valid:
        raise ConfigError(
            f"unknown lr_scheduler {cfg.lr_scheduler!r}; {did_you_mean(name, valid)}"
            f"choose one of: {', '.join(valid)}"
        )
    try:
        return get_scheduler(
            name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total_steps
        )
    except ValueError as exc:
        raise ConfigError(f"lr_scheduler {name!r}: {exc}") from None


__all__ = ["BUILTIN_OPTIMIZERS", "build_optimizer", "build_scheduler", "check_optimizer_type"]
