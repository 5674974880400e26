"""Wan 2.2 A14B's two experts in one run: where musubi-tuner keeps the inactive one.

musubi's ``--dit_high_noise PATH`` loads the high-noise expert next to the low-noise one
(``wan_train_network.load_transformer``) and swaps their state dicts at the timestep boundary
(``swap_high_low_weights``), so only one expert computes at a time. Where the inactive expert's
weights sit depends on the flags:

- ``--blocks_to_swap N``: the high-noise model gets its own block swap (musubi asserts
  ``--offload_inactive_dit`` is off), so its non-swapped blocks and the tensors outside the blocks
  stay on the GPU and its N swapped blocks in host RAM, exactly like the active expert's;
- ``--offload_inactive_dit`` (no block swap): the inactive expert waits in host RAM; at each switch
  the active expert is moved to the host first, so for a moment both are there;
- neither: both experts sit on the GPU.

Both experts have the same shapes, so one manifest describes both; the expert's weights are the
active one's (:class:`~ffid.estimate.base.BasePlacement`) once more.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import BasePlacement


@dataclass(frozen=True)
class ExpertPlacement:
    """Bytes of the inactive expert's base weights by place, and the host peak while loading."""

    gpu: int  # on the GPU for the whole run
    host: int  # in host RAM for the whole run
    switch: int  # host RAM the active expert passes through at each switch (offload only)
    load_peak: int  # host RAM while musubi loads the two experts, one after the other


def check_experts(experts: int, offload_inactive_dit: bool, blocks_to_swap: int) -> int:
    """Validate the expert flags (one line saying what to change) and return ``experts``."""
    if experts not in (1, 2):
        raise ConfigError(
            f"experts={experts!r} is not supported: a Wan 2.2 A14B run has 1 or 2 experts "
            "(2 is musubi's --dit_high_noise)"
        )
    if offload_inactive_dit and experts != 2:
        raise ConfigError(
            "--offload_inactive_dit needs --dit_high_noise (it offloads the inactive expert of a "
            "two-expert run); drop it or add --dit_high_noise"
        )
    if offload_inactive_dit and blocks_to_swap:
        raise ConfigError(
            f"--offload_inactive_dit with --blocks_to_swap {blocks_to_swap}: musubi-tuner refuses the "
            "pair (block swap already keeps the inactive expert's swapped blocks on the host); drop one"
        )
    return experts


def place_inactive_expert(base: BasePlacement, load_one: int, offload_inactive_dit: bool) -> ExpertPlacement:
    """Where the inactive expert lives, given the active expert's placement ``base`` and the
    host peak of loading one expert ``load_one``."""
    if base.parked:
        # the first expert's swapped blocks are already in RAM while the second one loads
        return ExpertPlacement(base.resident, base.parked, 0, load_one + base.parked)
    if offload_inactive_dit:
        return ExpertPlacement(0, base.model, base.model, load_one)
    return ExpertPlacement(base.model, 0, 0, load_one)
