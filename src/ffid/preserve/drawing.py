"""The model's own drawings of a prompt, for a flow-matching model (Wan, the demo).

Projection protects the inputs a layer sees while the model draws the protected prompts. A task
that can run its model but has no sampler of its own (musubi's DiT, ffid train's Wan task) gets
one here: Euler steps of the flow ``x_t = (1 - t) x_0 + t * noise`` from pure noise (``t = 1``)
to ``t = 0``, with the velocity ``noise - x_0`` the model predicts, and the time shift flow
matching samplers use. It is a plain, deterministic sampler: the drawings only need to lie where
sampling goes, not to be beautiful.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch


def flow_times(steps: int, shift: float = 1.0) -> list[float]:
    """``steps + 1`` times from 1 down to 0, shifted towards high noise as flow samplers do
    (``t = shift * s / (1 + (shift - 1) * s)`` for ``s`` evenly spaced)."""
    if steps < 1:
        raise ValueError(f"steps = {steps} must be at least 1")
    out = []
    for i in range(steps + 1):
        s = 1.0 - i / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


@torch.no_grad()
def draw_flow(
    velocity: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    shift: float = 1.0,
) -> torch.Tensor:
    """Draw from ``noise`` with ``steps`` Euler steps; ``velocity(x, t)`` is the model's
    prediction of ``noise - x_0`` at time ``t`` in [0, 1]. Returns ``x_0`` in ``noise``'s dtype."""
    x = noise.float()
    times = flow_times(steps, shift)
    for a, b in itertools.pairwise(times):
        x = x + (b - a) * velocity(x.to(noise.dtype), a).float()
    return x.to(noise.dtype)


def renoise(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(1 - t) x_0 + t * noise`` with fresh noise from ``generator`` (``t`` one per item)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, torch.float32)
    tt = t.to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
    return ((1 - tt) * x0.float() + tt * noise).to(x0.dtype)
