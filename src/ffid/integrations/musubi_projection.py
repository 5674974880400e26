"""Protection by projection inside an unmodified musubi-tuner (see :mod:`ffid.preserve.projection`).

The projection method needs no extra forward per step, so unlike the loss method it fits
musubi's block swap. Two pieces reach into musubi's run from the network module alone:

- **The feature pass**, once, at the first training call of the DiT (a forward pre-hook; the
  call shows the latent shape and how musubi passes its arguments). The DiT draws each protected
  prompt (its text encoding from ``preserve_cache``) with its own forward, as the model was before
  this run (:meth:`~ffid.engine.FfidHandle.teacher`), re-noises each drawing at random times and
  runs those inputs once more while forward pre-hooks fold every trained layer's inputs into a
  Gram matrix. Under block swap this is musubi's own schedule: the pass is framed like musubi's
  mid-training sampling (``switch_block_swap_for_inference`` before, ``..._for_training`` after),
  and the forwards stream the blocks as sampling does. Each layer's input is reduced to its Gram
  matrix as it is read, so no activations are kept beyond the block that is running.
- **The projection at each optimizer step.** musubi builds and steps the optimizer itself, so
  ffid registers torch's global optimizer step hooks and acts only for the optimizer holding this
  network's values: the gradient is projected before the step (after musubi's clipping), the
  change since the run started after it. With gradient accumulation accelerate steps the
  optimizer only on the last micro-step, and so do the hooks.

Resume: the bases are rebuilt, not stored. Their inputs depend on the seed (``--seed``), the
protected prompts, the model as loaded and the latent shape of the first training call. That
shape is kept in the network's state (a small buffer saved by ``--save_state``), so a resumed run
draws the same inputs as the uninterrupted one, whatever its first batch is.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..preserve import ProjectionSettings, Projector, Protected
from ..preserve.drawing import draw_flow, renoise
from .musubi_inputs import CallShapes, MusubiInputs

logger = logging.getLogger(__name__)

SHAPE_SLOTS = 8  # [1 (recorded), ndim, up to 5 dims, seq_len or -1]
DEFAULT_SHIFT = 3.0  # musubi's --discrete_flow_shift default for Wan training


def empty_record() -> torch.Tensor:
    """The state buffer before the first training call (nothing recorded)."""
    return torch.zeros(SHAPE_SLOTS, dtype=torch.int64)


def _encode(item: Sequence[int], seq_len: int | None) -> torch.Tensor:
    if len(item) > SHAPE_SLOTS - 3:
        raise ConfigError(f"ffid projection: a latent of {len(item)} dims is not a Wan latent")
    dims = [*item, *([0] * (SHAPE_SLOTS - 3 - len(item)))]
    return torch.tensor([1, len(item), *dims, -1 if seq_len is None else seq_len], dtype=torch.int64)


def _decode(record: torch.Tensor) -> tuple[tuple[int, ...], int | None] | None:
    v = [int(x) for x in record.tolist()]
    if v[0] == 0:
        return None
    ndim = v[1]
    if v[0] != 1 or not 0 < ndim <= SHAPE_SLOTS - 3 or any(d <= 0 for d in v[2 : 2 + ndim]):
        raise ConfigError(
            f"the resumed state's ffid projection record {v} is damaged; resume from another state"
        )
    return tuple(v[2 : 2 + ndim]), (None if v[-1] < 0 else v[-1])


class MusubiProjection(MusubiInputs):
    """The projection method for a musubi DiT: feature pass at the first training call, projection
    at every step of the optimizer that holds ``handle``'s values."""

    def __init__(
        self,
        handle: Any,
        encodings: dict[str, tuple[Path, str]],
        settings: ProjectionSettings,
        record: torch.Tensor,
        seed: int = 0,
        shift: float = DEFAULT_SHIFT,
        expert: tuple[str, Any, float, float] | None = None,
    ):
        super().__init__(encodings)
        # Wan 2.2's two experts: (name, () -> the active expert's name, lowest time, highest
        # time). This projector then protects that expert only: its feature pass runs at the first
        # training call the expert serves, at times in its range, and it projects that expert's
        # values only on steps that trained them.
        self.expert = expert
        protected = [Protected(p, "preserve_cache") for p in encodings]
        self.projector = Projector(handle, self, protected, settings)
        self.record = record  # the network's state buffer: the first call's latent shape
        self.seed = seed
        self.shift = shift
        self._busy = False
        self._hooks: list[Any] = []
        # optimizer -> whether it holds this network's values; weak, so a later optimizer at a
        # freed one's address is asked afresh
        self._ours: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = weakref.WeakKeyDictionary()

    # -- hooks ----------------------------------------------------------------------------------
    def install(self, dit: nn.Module) -> None:
        """Hook the DiT's first training call and every optimizer step."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._hooks = [
            dit.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def ready(self) -> bool:
        """Whether the feature pass has run."""
        return self.projector.stats is not None

    def _serving(self) -> bool:
        return self.expert is None or self.expert[1]() == self.expert[0]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.ready or self._busy or not torch.is_grad_enabled() or not self._serving():
            return  # done; our own forwards; sampling and validation (run without grad); the other expert
        shapes = CallShapes(args, kwargs)
        recorded = _decode(self.record)
        if recorded is None:
            self.record.copy_(_encode(shapes.item, shapes.seq_len))
        else:
            shapes.with_item(*recorded)
        self.shapes = shapes
        self._busy = True
        try:
            self._feature_pass(module)
        finally:
            self._busy = False
            self.shapes = None  # the recorded call's tensors are not kept alive
        which = (
            f" ({self.expert[0]} expert, times {self.expert[2]:g}-{self.expert[3]:g})" if self.expert else ""
        )
        logger.info("ffid feature pass done%s:\n%s", which, self.projector.describe())

    def _feature_pass(self, dit: nn.Module) -> None:
        swapped = bool(getattr(dit, "blocks_to_swap", 0))
        # musubi's own framing of forwards without backward under block swap (its sampling)
        if swapped and callable(getattr(dit, "switch_block_swap_for_inference", None)):
            dit.switch_block_swap_for_inference()
        try:
            self.projector.collect(dit, torch.Generator().manual_seed(self.seed))
        finally:
            if swapped and callable(getattr(dit, "switch_block_swap_for_training", None)):
                dit.switch_block_swap_for_training()

    def _holds_ours(self, optimizer: torch.optim.Optimizer) -> bool:
        if optimizer not in self._ours:
            mine = {id(p) for p in self.projector.handle.parameters()}
            self._ours[optimizer] = any(id(p) in mine for g in optimizer.param_groups for p in g["params"])
        return self._ours[optimizer]

    def _acts(self, optimizer: torch.optim.Optimizer) -> bool:
        if not self._holds_ours(optimizer):
            return False
        if self.expert is None:
            return True
        # an expert's values are projected on the steps that trained them (after its feature
        # pass; the other expert's steps leave them as they are, and so does the projection)
        return self.ready and self.projector.has_grads()

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.projector.settings.project_grad and self._acts(optimizer):
            self.projector.project_grads()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._acts(optimizer):
            self.projector.project()

    # -- ProjectionSource ----------------------------------------------------------------------
    def projection_batches(
        self,
        model: nn.Module,
        prompts: Sequence[str],
        generator: torch.Generator,
        settings: ProjectionSettings,
    ) -> list[dict[str, Any]]:
        """Each prompt drawn ``settings.draws`` times by the DiT (Euler flow steps, musubi's time
        shift), each drawing re-noised at ``settings.times`` random times; one item per batch, so
        the pass never needs more activation memory than a training step of batch size one."""
        s = self._call_shapes()
        out = []
        for prompt in prompts:
            for _ in range(settings.draws):
                noise = torch.randn((1, *s.item), generator=generator)

                def velocity(x: torch.Tensor, t: float, prompt: str = prompt) -> torch.Tensor:
                    batch = self.batch([prompt], x, torch.full((1,), t))
                    return self.preservation_outputs(model, batch).float().cpu()

                drawn = draw_flow(velocity, noise, settings.sample_steps, self.shift)
                for _ in range(settings.times):
                    t = torch.rand(1, generator=generator)
                    if self.expert is not None:  # the expert's own range of times
                        t = self.expert[2] + (self.expert[3] - self.expert[2]) * t
                    out.append(self.batch([prompt], renoise(drawn, t, generator), t))
        return out
