"""ffid with diffusers pipelines: train ``pipe.transformer`` (or ``pipe.unet``), apply deltas for inference.

The recipe (docs/integrations.md has the full script)::

    handle = attach_to_pipeline(pipe, ff=0.01, ffid=1)      # trains pipe.transformer's own weights
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-4)
    ...  # your diffusers training loop, calling pipe.transformer(...) as usual
    handle.save_delta("character1.safetensors")

    pipe = WanPipeline.from_pretrained(...)                 # later, for inference
    apply_delta_to_pipeline(pipe, "character1.safetensors")  # bakes the values in, checked first

Deltas use canonical names; one trained on a diffusers ``WanTransformer3DModel`` applies to the
original-naming checkpoint (``ffid merge``, ComfyUI) and the other way round.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import ConfigError

DENOISER_ATTRS = ("transformer", "unet")


def denoiser_of(pipe: Any) -> nn.Module:
    """The trainable denoiser of a diffusers pipeline (``transformer``, else ``unet``), or a module as is."""
    if isinstance(pipe, nn.Module):
        return pipe
    for attr in DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return module
    raise ConfigError(
        f"{type(pipe).__name__} has no transformer or unet module; pass the module to train itself"
    )


def attach_to_pipeline(
    pipe: Any, ff: float | None = None, ffid: int | None = None, selector: str | None = None, **kwargs: Any
) -> Any:
    """:func:`ffid.attach` on the pipeline's denoiser; returns the :class:`~ffid.engine.FfidHandle`.

    ``kwargs`` go to :func:`ffid.attach` (``selection=``, a Selection or its settings;
    ``include=``, ``exclude=``, ``device=``, ...).
    """
    from ..engine import attach

    model = denoiser_of(pipe)
    if "selection" in kwargs:
        return attach(model, **kwargs)
    return attach(model, ff=ff, ffid=ffid, selector=selector, **kwargs)


def apply_delta_to_pipeline(
    pipe: Any, delta: str | os.PathLike[str] | Any, multiplier: float = 1.0, verify: bool = True
) -> Any:
    """Write a delta's values into the pipeline's denoiser (see :func:`ffid.checkpoint.delta.apply_delta`).

    ``multiplier`` scales the change (``base + m * (trained - base)``); with ``verify`` the base
    values are checked first, so a delta is never applied to the wrong model or twice.
    """
    from ..checkpoint.delta import apply_delta

    return apply_delta(denoiser_of(pipe), delta, multiplier, verify=verify)
