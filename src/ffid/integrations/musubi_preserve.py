"""Preservation inside an unmodified musubi-tuner (see :mod:`ffid.preserve`).

musubi computes its loss itself, out of a network module's reach. The module can reach the DiT,
though: a forward hook on it runs, after each training forward, the preservation term (the
teacher, base + earlier deltas, on protected prompts at pure-noise latents and random times, and
the student on the same inputs) and ties that term to the DiT's output through a tiny autograd
function, :class:`_AddLoss`, whose backward hands the term a gradient of one. musubi's own
``accelerator.backward(loss)`` then backpropagates both in one pass; no musubi code changes.

Protected prompts come as musubi text-encoder caches (``*_wan_te.safetensors``): musubi merges
``--base_weights`` without their metadata, so the prompts the earlier runs recorded cannot be read
here; the earlier character's own cache folder is what the user has.

Inputs copy the shape of the training call (:mod:`.musubi_inputs`). The loss method adds two
forwards to every step, which musubi's block swap does not schedule; under block swap the
projection method (:mod:`.musubi_projection`) protects instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..preserve import Preserver, PreserveSettings, Protected
from .musubi_inputs import CallShapes, MusubiInputs

logger = logging.getLogger(__name__)
LOG_EVERY = 10  # preservation steps between two log lines


class _AddLoss(torch.autograd.Function):
    """Identity on ``out`` that also backpropagates ``loss`` (with a gradient of ``scale``)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_meta = (loss.dtype, loss.device)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        dtype, device = ctx.loss_meta
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


class MusubiPreservation(MusubiInputs):
    """The loss method's forward hook on a musubi DiT (inputs from :class:`MusubiInputs`)."""

    def __init__(
        self,
        handle: Any,
        encodings: dict[str, tuple[Path, str]],
        settings: PreserveSettings,
        seed: int = 0,
        grad_scale: float = 1.0,
    ):
        super().__init__(encodings)
        protected = [Protected(p, "preserve_cache") for p in encodings]
        # musubi's Wan has no dropout and checkpoints only in training mode: stay in train mode
        self.preserver = Preserver(handle, self, protected, settings, eval_mode=False)
        self.seed = seed
        self.grad_scale = grad_scale
        self.calls = 0
        self.last: dict[str, float] = {}
        self._busy = False
        self._hook: Any = None

    # -- hook --------------------------------------------------------------------------------
    def install(self, dit: nn.Module) -> None:
        self._hook = dit.register_forward_hook(self._after_forward, with_kwargs=True)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._busy or not torch.is_grad_enabled():
            return None  # our own forwards; sampling and validation (musubi runs them without grad)
        step = self.calls
        self.calls += 1
        if not self.preserver.due(step):
            return None
        self.shapes = CallShapes(args, kwargs)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        self._busy = True
        try:
            kept = self.preserver.step(module, step, generator)
        finally:
            self._busy = False
        assert kept is not None
        if not torch.isfinite(kept.loss.detach()):
            from ..errors import TrainingError

            raise TrainingError(
                f"ffid preservation distance is {kept.distance} at call {step + 1}; lower --learning_rate "
                "or preserve_weight"
            )
        self.last = {"distance": kept.distance, **kept.per_prompt}
        if (step // self.preserver.settings.every) % LOG_EVERY == 0:
            logger.info(
                "ffid preservation: distance %.4g (%s)",
                kept.distance,
                ", ".join(f"{k}: {v:.3g}" for k, v in kept.per_prompt.items()),
            )
        if isinstance(output, (list, tuple)):
            out = list(output)
            out[0] = _AddLoss.apply(out[0], kept.loss, self.grad_scale)
            return type(output)(out) if isinstance(output, tuple) else out
        return _AddLoss.apply(output, kept.loss, self.grad_scale)
