"""Selector registry and :func:`plan`, the entry point that turns (model, ff, ffid) into a Selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConfigError
from ..manifest import Manifest
from ..models import load_manifest
from ..names import filter_names
from ..selection import Selection
from .compat_v2 import POOLS, select_compat_v2
from .spread import DEFAULT_SLOTS, select_spread

SELECTORS: dict[str, Callable[..., Selection]] = {
    "spread": select_spread,
    "compat-v2": select_compat_v2,
}
SELECTOR_HELP = {
    "spread": f"exact element budget from every tensor; {DEFAULT_SLOTS} disjoint ids by default",
    "compat-v2": f"the original v2.0 whole-tensor algorithm, {POOLS} disjoint pools (ids 0..7)",
}


def check_ff(ff: Any) -> float:
    """Validate ``--ff``: a number with 0 < ff <= 1."""
    try:
        value = float(ff)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--ff {ff!r} is not a number;"
            " give a fraction such as 0.01 (1% of the model)"
        ) from None
    if isinstance(ff, bool) or not math.isfinite(value) or not 0 < value <= 1:
        raise ConfigError(
            f"--ff {ff!r} is out of range; it is the fraction of the model to train, 0 < ff <= 1 (e.g. 0.01)"
        )
    return value


def check_ffid(ffid: Any) -> int:
    """Validate ``--ffid``: a non-negative integer (the selector checks its upper bound)."""
    try:
        value = int(str(ffid).strip()) if not isinstance(ffid, int) or isinstance(ffid, bool) else ffid
    except ValueError:
        raise ConfigError(f"--ffid {ffid!r} is not an integer; give a selection id such as 1") from None
    if isinstance(ffid, (bool, float)) or value < 0:
        raise ConfigError(f"--ffid {ffid!r} must be a non-negative integer such as 1")
    return value


def plan(
    model: Any,
    ff: float,
    ffid: int,
    selector: str = "spread",
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    block_pattern: str | None = None,
    **options: Any,
) -> Selection:
    """Decide which elements a run with ``ff`` / ``ffid`` trains.

    ``model`` is an ``nn.Module`` (meta device fine), a path to a ``.safetensors`` file, index or
    model folder, a preset name (``wan2.2-t2v-14b``) or a :class:`~ffid.manifest.Manifest`.
    ``include`` / ``exclude`` are regexes searched in canonical tensor names. ``options`` go to the
    selector (``slots``, ``seed`` for ``spread``). Nothing but names, shapes and dtypes is read.
    """
    if selector not in SELECTORS:
        import difflib

        near = difflib.get_close_matches(str(selector), SELECTORS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"unknown selector {selector!r}; {hint}choose one of: {', '.join(SELECTORS)}")
    ff = check_ff(ff)
    ffid = check_ffid(ffid)
    manifest: Manifest = load_manifest(model, block_pattern)
    names = filter_names(manifest.names, include, exclude)
    if selector == "compat-v2" and options:
        raise ConfigError(
            f"compat-v2 takes no options ({', '.join(options)} given);"
            " it reproduces the original algorithm as is"
        )
    sel = SELECTORS[selector](manifest, ff=ff, ffid=ffid, names=names, **options)
    if include:
        sel.params["include"] = list(include)
    if exclude:
        sel.params["exclude"] = list(exclude)
    return sel


__all__ = ["SELECTORS", "check_ff", "check_ffid", "plan"]
