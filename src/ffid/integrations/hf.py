"""Train a selection with a Hugging Face ``transformers.Trainer``.

Two equivalent ways::

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    handle = attach_to_trainer(trainer, ff=0.01, ffid=1)   # before trainer.train()
    trainer.train()                                        # or train(resume_from_checkpoint=True)

    trainer = FfidTrainer(model=model, args=args, train_dataset=ds, ff=0.01, ffid=1)

What changes in the Trainer (and only in that instance):

- the optimizer is built on the handle's proxies (Trainer's optimizer choice, learning rate and
  weight decay, no decay on biases and norms as usual), guarded by ``handle.guard`` (NaN/inf
  checks); an optimizer passed with ``optimizers=(opt, sched)`` is checked instead;
- gradient clipping and zeroing act on the proxies, which are not parameters of the model;
- with several processes the proxy gradients are averaged before each step, and the frozen
  model is prepared without a DDP wrapper (DDP refuses a module with no trainable parameter,
  and nothing of the model needs syncing);
- checkpoints hold ``ffid_delta.safetensors`` (the trained values: kilobytes to megabytes) instead
  of the whole model, plus the usual optimizer / scheduler / RNG / trainer state; resuming
  (``train(resume_from_checkpoint=...)``) loads the delta back into the proxies.

Preservation (keep what earlier ids taught, without their data) for a Trainer trained on top of
earlier deltas: ``attach_to_trainer(trainer, ff=0.01, ffid=2, preserve={"base_deltas": [d1],
"prompts": ["..."]})``; each training step then adds ``weight * KL(teacher || student)`` on the
protected texts (see :mod:`ffid.preserve`), and the logs get ``preserve_distance``.

Get the finished model with ``ffid merge BASE checkpoint-N/ffid_delta.safetensors -o OUT`` or
``handle.merge()`` / ``handle.save_full(path)`` in Python.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MismatchError, ModelFileError
from ..names import canonical_name
from ._common import refuse_sharding

DELTA_NAME = "ffid_delta.safetensors"


def all_reduce_grads(params: Any) -> None:
    """Average the gradients of ``params`` over all processes (no-op in a single process).

    Proxies live outside the model, so a trainer that wraps only the model in DDP never syncs
    them; call this (or wrap the handle itself in DDP) between backward and the optimizer step.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # One flat buffer: one collective per step instead of one per tensor.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


class FfidTrainerMixin:
    """The Trainer overrides; mixed in front of the user's Trainer class by :func:`attach_to_trainer`."""

    ffid_handle: Any

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:  # type: ignore[override]
        """Trainer's optimizer choice, built on the proxies only."""
        if self.optimizer is None:  # type: ignore[attr-defined]
            handle = self.ffid_handle
            decay = {canonical_name(n) for n in self.get_decay_parameter_names(handle.model)}  # type: ignore[attr-defined]
            groups = [
                {
                    "params": [p for n, p in handle.proxies() if n in decay],
                    "weight_decay": self.args.weight_decay,
                },  # type: ignore[attr-defined]
                {"params": [p for n, p in handle.proxies() if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, handle.model)  # type: ignore[attr-defined]
            kwargs = {k: v for k, v in kwargs.items() if k not in ("params", "model")}
            self.optimizer = cls(groups, **kwargs)  # type: ignore[attr-defined]
        _hook_optimizer(self.ffid_handle, self.optimizer)  # type: ignore[attr-defined]
        projector = getattr(self, "ffid_projector", None)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # type: ignore[attr-defined]
        if projector is not None and not getattr(inner, "_ffid_projected", False):
            projector.install(inner)
            inner._ffid_projected = True
        return self.optimizer  # type: ignore[attr-defined,no-any-return]

    def compute_loss(self, model: nn.Module, inputs: Any, return_outputs: bool = False, **kwargs: Any) -> Any:  # type: ignore[override]
        """The Trainer's loss plus, in training with preservation on, the preservation term.

        Its inputs are drawn from a generator seeded by (seed, global step), so a resumed run
        draws what the uninterrupted one did."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)  # type: ignore[misc]
        preserver = getattr(self, "ffid_preserver", None)
        if preserver is None or not model.training:
            return out
        step = self.state.global_step  # type: ignore[attr-defined]
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)  # type: ignore[attr-defined]
        target = self.ffid_handle.model
        kept = preserver.step(target, step, generator, device=next(target.parameters()).device)
        if kept is None:
            return out
        self._ffid_kept.append(kept)
        if return_outputs:
            loss, outputs = out
            return loss + kept.loss, outputs
        return out + kept.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``preserve_distance`` and ``preserve/<text>`` (means since the last log) to training logs."""
        kept = getattr(self, "_ffid_kept", None)
        if kept and "loss" in logs:
            logs["preserve_distance"] = sum(k.distance for k in kept) / len(kept)
            per: dict[str, list[float]] = {}
            for k in kept:
                for label, value in k.per_prompt.items():
                    per.setdefault(label, []).append(value)
            logs.update({f"preserve/{label}": sum(v) / len(v) for label, v in per.items()})
            kept.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        return self.accelerator.clip_grad_norm_(  # type: ignore[attr-defined]
            list(self.ffid_handle.parameters()),
            self.args.max_grad_norm,  # type: ignore[attr-defined]
        )

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is not None:
            return grad_norm
        grads = [p.grad for p in self.ffid_handle.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else None

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """Save the trained values (a delta), the training arguments and the tokenizer; not the model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        os.makedirs(output_dir, exist_ok=True)
        self.ffid_handle.save_delta(os.path.join(output_dir, DELTA_NAME))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))  # type: ignore[attr-defined]
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is not None and hasattr(processor, "save_pretrained"):
            processor.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the proxies take the values of the checkpoint's delta (same selection only)."""
        load_delta_into(self.ffid_handle, os.path.join(resume_from_checkpoint, DELTA_NAME))

    def _load_best_model(self) -> None:
        # Only reachable with load_best_model_at_end, refused when attaching; kept as a guard.
        raise ConfigError(
            "load_best_model_at_end is not supported with ffid; merge the best checkpoint's delta"
        )


def _hook_optimizer(handle: Any, optimizer: Any) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if getattr(inner, "_ffid_hooked", False):
        return
    handle.check_optimizer(inner)
    params = list(handle.parameters())
    # Registered before guard(): gradients are averaged over processes before the NaN check.
    inner.register_step_pre_hook(lambda opt, args, kwargs: all_reduce_grads(params))
    handle.guard(inner)
    # Trainer zeroes the model's gradients only; the proxies are not in the model.
    inner.register_step_post_hook(lambda opt, args, kwargs: handle.zero_grad(set_to_none=True))
    inner._ffid_hooked = True


def load_delta_into(handle: Any, path: str | os.PathLike[str]) -> int:
    """Set ``handle``'s proxies from the delta at ``path``; refuses a delta of another selection.

    Returns the number of values loaded.
    """
    from ..checkpoint.delta import load_delta

    if not os.path.exists(path):
        raise ModelFileError(
            f"{path} does not exist; resume from a checkpoint folder written while ffid was attached"
        )
    # An implicit-index delta rebuilds its positions from the model the handle was planned on.
    delta = load_delta(path, base=handle.selection.manifest)
    if delta.info.selection_fingerprint != handle.selection.fingerprint:
        raise MismatchError(
            f"{path} holds selection {delta.info.selection_fingerprint} but the trainer trains "
            f"{handle.selection.fingerprint}; attach with the same ff, ffid and selector as the saved run"
        )
    handle.load_values(delta.values())
    return delta.selected


def _check_args(args: Any) -> None:
    if getattr(args, "load_best_model_at_end", False):
        raise ConfigError(
            "load_best_model_at_end=True reloads full model weights, which ffid checkpoints do not hold; "
            "set it to False and merge the best checkpoint's ffid_delta.safetensors"
        )
    if getattr(args, "deepspeed", None):
        refuse_sharding("DEEPSPEED")
    if getattr(args, "fsdp", None):
        refuse_sharding("FSDP")


def attach_to_trainer(
    trainer_or_model: Any,
    ff: float | None = None,
    ffid: int | None = None,
    selector: str | None = None,
    *,
    selection: Any = None,
    preserve: dict[str, Any] | None = None,
    **plan_kwargs: Any,
) -> Any:
    """Attach ffid so that ``trainer.train()`` trains only the selected elements; returns the handle.

    ``trainer_or_model`` is a ``transformers.Trainer`` (any subclass) built but not yet trained,
    or a bare model (then this is :func:`ffid.attach`). ``selection`` is a
    :class:`~ffid.selection.Selection` or :class:`~ffid.select.SelectionSettings`; otherwise
    ``ff``/``ffid``/``selector`` and ``plan_kwargs`` (``include=``, ``slots=``, ...) make them.
    The Trainer's class is swapped for a subclass with the overrides listed in the module
    docstring; nothing else about it changes.

    ``preserve`` turns preservation on for a Trainer whose model already holds earlier deltas:
    ``{"base_deltas": [paths whose recorded prompts to protect], "prompts": [more texts],
    "weight": 16.0, "items": 4, "every": 1, "empty": True}`` (every key optional, at least one
    text must result). It needs the Trainer's tokenizer (``processing_class``). With
    ``"method": "projection"`` (and optionally ``"energy"``) the selection must be whole rows
    (``selector="rows"``): the feature pass runs here, in eval mode and without gradients (the
    model's checkpointing setting is left alone), and every optimizer step projects the change
    off the protected texts' inputs instead of adding a loss term.
    """
    from ..engine import attach

    def _attach(model: nn.Module) -> Any:
        if selection is not None:
            return attach(model, selection)
        return attach(model, ff=ff, ffid=ffid, selector=selector, **plan_kwargs)

    if isinstance(trainer_or_model, nn.Module):
        return _attach(trainer_or_model)
    trainer = trainer_or_model
    if not hasattr(trainer, "model") or not hasattr(trainer, "args"):
        raise ConfigError(
            f"attach_to_trainer needs a transformers Trainer or an nn.Module, got {type(trainer).__name__}"
        )
    if getattr(trainer, "ffid_handle", None) is not None:
        raise ConfigError("this Trainer already has ffid attached; call attach_to_trainer once per Trainer")
    _check_args(trainer.args)
    preserve_settings = _preserve_settings(preserve) if preserve is not None else None
    handle = _attach(trainer.model)
    preserver = projector = None
    if preserve_settings is not None:
        try:
            if preserve_settings[2] == "projection":
                projector = _projector(trainer, handle, *preserve_settings)
            else:
                preserver = _preserver(trainer, handle, *preserve_settings[:2])
        except Exception:
            handle.detach()  # refused: leave the model and the Trainer as they were
            raise
    trainer.ffid_handle = handle
    trainer.ffid_preserver = preserver
    trainer.ffid_projector = projector
    trainer._ffid_kept = []
    cls = type(trainer)
    if not issubclass(cls, FfidTrainerMixin):
        trainer.__class__ = type(f"Ffid{cls.__name__}", (FfidTrainerMixin, cls), {})
    if getattr(trainer, "optimizer", None) is not None:
        _hook_optimizer(handle, trainer.optimizer)
    _skip_ddp_for(trainer, handle.model)
    return handle


PRESERVE_KEYS = ("base_deltas", "prompts", "weight", "items", "every", "empty", "method", "energy")


def _preserve_settings(options: dict[str, Any]) -> tuple[Any, Any, str, Any]:
    """(protected texts, PreserveSettings, method, ProjectionSettings) from ``attach_to_trainer``'s
    ``preserve`` dict."""
    from ..errors import did_you_mean
    from ..preserve import DEFAULT_WEIGHT, METHODS, PreserveSettings, ProjectionSettings, protected_prompts

    if not isinstance(options, dict):
        raise ConfigError(
            f"preserve must be a dict such as {{'base_deltas': [...]}}, not {type(options).__name__}"
        )
    unknown = [k for k in options if k not in PRESERVE_KEYS]
    if unknown:
        raise ConfigError(
            f"preserve key {unknown[0]!r} is unknown; {did_you_mean(unknown[0], PRESERVE_KEYS)}"
            f"valid keys: {', '.join(PRESERVE_KEYS)}"
        )
    protected = protected_prompts(
        list(options.get("base_deltas", [])),
        empty=bool(options.get("empty", True)),
        extra=list(options.get("prompts", [])),
    )
    settings = PreserveSettings(
        float(options.get("weight", DEFAULT_WEIGHT)),
        int(options.get("items", 4)),
        int(options.get("every", 1)),
    ).validate()
    method = options.get("method", "loss")
    if method not in METHODS:
        raise ConfigError(f"preserve method {method!r} is not one of {', '.join(METHODS)}")
    # texts are not sampled: one pass over them is the whole protected set
    projection = ProjectionSettings(energy=options.get("energy", 0.99), draws=1, times=1).validate()
    return protected, settings, method, projection


def _texts(trainer: Any) -> Any:
    """The protected texts' encoder for either method: the Trainer's tokenizer, or a refusal."""
    from ..preserve import TextPreservation

    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError(
            "preserve needs the Trainer's tokenizer to encode the protected texts; build the Trainer "
            "with processing_class=tokenizer"
        )
    return TextPreservation(tokenizer)


def _preserver(trainer: Any, handle: Any, protected: Any, settings: Any) -> Any:
    from ..preserve import Preserver

    return Preserver(handle, _texts(trainer), protected, settings)


def _projector(trainer: Any, handle: Any, protected: Any, settings: Any, method: str, projection: Any) -> Any:
    """The feature pass over the protected texts, now; the optimizer is hooked when it is made."""
    from ..preserve import Projector

    projector = Projector(handle, _texts(trainer), protected, projection)
    model = handle.model
    device = next(model.parameters()).device
    projector.collect(model, torch.Generator().manual_seed(int(trainer.args.seed)), device=device)
    return projector


def _skip_ddp_for(trainer: Any, model: nn.Module) -> None:
    """Prepare the frozen model without a DDP wrapper (accelerate wraps it on multi-CPU runs, and DDP
    refuses a module with no trainable parameter); the proxies are synced by :func:`all_reduce_grads`."""
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None or getattr(accelerator, "_ffid_no_ddp", None) is not None:
        return
    original = accelerator.prepare_model

    def prepare_model(module: nn.Module, device_placement: Any = None, evaluation_mode: bool = False) -> Any:
        # evaluation_mode only skips the distributed wrappers; device placement and autocast still apply
        return original(
            module, device_placement=device_placement, evaluation_mode=evaluation_mode or module is model
        )

    accelerator.prepare_model = prepare_model
    accelerator._ffid_no_ddp = model


def _trainer_class() -> type:
    from transformers import Trainer

    class FfidTrainer(FfidTrainerMixin, Trainer):  # type: ignore[misc]
        """A ``transformers.Trainer`` that trains an ffid selection of its model.

        Takes the Trainer's arguments plus ``ff``, ``ffid``, ``selector`` (or ``selection``),
        ``ffid_options`` (a dict for the planner: ``include``, ``exclude``, ``slots``, ...) and
        ``preserve`` (see :func:`attach_to_trainer`).
        """

        def __init__(
            self,
            *args: Any,
            ff: float | None = None,
            ffid: int | None = None,
            selector: str | None = None,
            selection: Any = None,
            ffid_options: dict[str, Any] | None = None,
            preserve: dict[str, Any] | None = None,
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.ffid_handle = None
            attach_to_trainer(
                self, ff, ffid, selector, selection=selection, preserve=preserve, **(ffid_options or {})
            )

    return FfidTrainer


def __getattr__(name: str) -> Any:
    # transformers is imported only when FfidTrainer is asked for.
    if name == "FfidTrainer":
        cls = _trainer_class()
        globals()["FfidTrainer"] = cls
        return cls
    raise AttributeError(name)
