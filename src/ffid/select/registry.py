"""The selector registry: name -> :class:`~ffid.select.base.Selector` object.

To add a selector, write a :class:`~ffid.select.base.Selector` subclass in its own module of this
package and add an instance to ``SELECTORS`` below; everything else finds it here.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, did_you_mean
from .base import Option, Selector
from .compat_v2 import CompatV2Selector
from .rows import RowsSelector
from .spread import SpreadSelector

SELECTORS: dict[str, Selector] = {s.name: s for s in (SpreadSelector(), CompatV2Selector(), RowsSelector())}
# The selector whose selections are whole rows of matrices: what protection by projection trains.
ROW_SELECTOR = RowsSelector.name


def get_selector(name: Any) -> Selector:
    """The registered selector called ``name``, or a one-line error listing the others."""
    if name not in SELECTORS:
        raise ConfigError(
            f"unknown selector {name!r}; {did_you_mean(name, SELECTORS)}choose one of: {', '.join(SELECTORS)}"
        )
    return SELECTORS[name]


def selector_options() -> dict[str, tuple[Option, tuple[str, ...]]]:
    """Every option name any registered selector takes -> (its first definition, the selectors
    that take it): what clients offer as flags or keys (``--slots``, ``network_args seed=``)."""
    out: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for selector in SELECTORS.values():
        for opt in selector.options:
            first, owners = out.get(opt.name, (opt, ()))
            out[opt.name] = (first, (*owners, selector.name))
    return out
