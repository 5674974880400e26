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

Inputs copy the shape of the training call: the latents' ``[C, F, H, W]``, musubi's 0..1000
timestep scale, and its way of passing text (a list of ``[L, D]`` tensors, or a batched tensor).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..preserve import Preserver, PreserveSettings, Protected, mse_per_item

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


def read_encodings(folders: list[str], wanted: list[str] | None = None) -> dict[str, tuple[Path, str]]:
    """Caption -> (file, key) of the text encodings in musubi (or ffid) cache folders; with
    ``wanted``, only those captions, each of which must be found."""
    from ..train.cache import text_encodings

    found: dict[str, tuple[Path, str]] = {}
    for folder in folders:
        for caption, where in text_encodings(folder).items():
            found.setdefault(caption, where)
    if wanted:
        missing = [p for p in wanted if p not in found]
        if missing:
            raise ConfigError(
                f"network_args preserve_prompts: {missing[0]!r} has no text encoding in "
                f"{', '.join(folders)}; cache it with wan_cache_text_encoder_outputs.py into one of them"
            )
        return {p: found[p] for p in wanted}
    if not found:
        raise ConfigError(
            f"network_args preserve_cache {', '.join(folders)} holds no text encodings "
            "(*_wan_te.safetensors); point it at the earlier character's musubi cache_directory"
        )
    return found


class _CallShapes:
    """What the current training call looks like, so protected inputs can be built like it."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args, self.kwargs = args, kwargs
        x = args[0] if args else kwargs["x"]
        self.x = x[0]  # one item, [C, F, H, W], from a list of them or a batched tensor
        self.x_is_list = isinstance(x, (list, tuple))
        t = kwargs["t"] if "t" in kwargs else args[1]
        self.t_dtype, self.device = t.dtype, t.device
        context = kwargs["context"] if "context" in kwargs else args[2]
        self.context_is_list = isinstance(context, (list, tuple))
        self.context_dtype = (context[0] if self.context_is_list else context).dtype
        for key in ("y", "clip_fea"):
            if kwargs.get(key) is not None:
                raise ConfigError(
                    f"ffid preservation in musubi is for text-to-video training; this run passes {key} "
                    "(image-to-video or control): drop the preserve_* network_args"
                )


class MusubiPreservation:
    """The forward hook and the :class:`~ffid.preserve.Preservable` side for a musubi DiT."""

    def __init__(
        self,
        handle: Any,
        encodings: dict[str, tuple[Path, str]],
        settings: PreserveSettings,
        seed: int = 0,
        grad_scale: float = 1.0,
    ):
        self.encodings = encodings
        protected = [Protected(p, "preserve_cache") for p in encodings]
        # musubi's Wan has no dropout and checkpoints only in training mode: stay in train mode
        self.preserver = Preserver(handle, self, protected, settings, eval_mode=False)
        self.seed = seed
        self.grad_scale = grad_scale
        self.calls = 0
        self.last: dict[str, float] = {}
        self._busy = False
        self._shapes: _CallShapes | None = None
        self._hook: Any = None
        self._text_cache: dict[str, torch.Tensor] = {}

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
        self._shapes = _CallShapes(args, kwargs)
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

    # -- Preservable ---------------------------------------------------------------------------
    def _text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text_cache:
            from safetensors import safe_open

            path, key = self.encodings[prompt]
            with safe_open(str(path), framework="pt") as f:
                self._text_cache[prompt] = f.get_tensor(key)
        return self._text_cache[prompt]

    def preservation_batch(self, prompts: list[str], generator: torch.Generator) -> dict[str, Any]:
        s = self._shapes
        assert s is not None
        n = len(prompts)
        noise = torch.randn((n, *s.x.shape), generator=generator).to(s.x.device, s.x.dtype)
        t = (torch.rand(n, generator=generator) * 1000).to(s.device, s.t_dtype)
        texts = [self._text(p).to(s.device, s.context_dtype) for p in prompts]
        if not s.context_is_list:
            width = max(tt.shape[0] for tt in texts)
            padded = torch.zeros(n, width, texts[0].shape[-1], dtype=s.context_dtype, device=s.device)
            for i, tt in enumerate(texts):
                padded[i, : tt.shape[0]] = tt
            texts = padded  # type: ignore[assignment]
        return {"x": list(noise) if s.x_is_list else noise, "t": t, "context": texts}

    def preservation_outputs(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        s = self._shapes
        assert s is not None
        kwargs = dict(s.kwargs)
        args = list(s.args)
        for i, key in enumerate(("x", "t", "context")):
            if key in kwargs:
                kwargs[key] = batch[key]
            elif i < len(args):
                args[i] = batch[key]
        out = model(*args, **kwargs)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        return mse_per_item(student, teacher)
