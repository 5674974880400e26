"""The training engine: :func:`attach` a selection to a model, train the proxies, merge/detach.

See :mod:`ffid.engine.handle` for what attaching changes and docs/engine.md for the per-layer
paths, memory and speed.
"""

from __future__ import annotations

from .guard import stochastic_round_bf16
from .handle import FfidHandle, attach
from .kernels import Pattern, SelectedMatmul

__all__ = ["FfidHandle", "Pattern", "SelectedMatmul", "attach", "stochastic_round_bf16"]
