"""Selectors and the one way to use them: :class:`SelectionSettings` -> :class:`~ffid.selection.Selection`.

``SELECTORS`` (:mod:`ffid.select.registry`) maps names to :class:`~ffid.select.base.Selector`
objects. To add a selector, write a subclass in its own module here and add an instance there;
every entry point (CLI, ``ffid train``, musubi, HF, estimate, the demo) then accepts it through
:class:`SelectionSettings`, and its options through their generic ``selector_args`` /
``--slots``-style flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..selection import Selection
from .base import Option, Selector
from .registry import ROW_SELECTOR, SELECTORS, get_selector, selector_options
from .settings import DEFAULT_SELECTOR, SelectionSettings, check_ff, check_ffid


def plan(
    model: Any,
    ff: float,
    ffid: int,
    selector: str = DEFAULT_SELECTOR,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    block_pattern: str | None = None,
    **options: Any,
) -> Selection:
    """Decide which elements a run with ``ff`` / ``ffid`` trains (shorthand for
    ``SelectionSettings.create(...).plan(model)``).

    ``model`` is an ``nn.Module`` (meta device fine), a path to a ``.safetensors`` file, index or
    model folder, a preset name (``wan2.2-t2v-14b``) or a :class:`~ffid.manifest.Manifest`.
    ``include`` / ``exclude`` are regexes searched in canonical tensor names. ``options`` go to the
    selector (``slots``, ``seed`` for ``spread``). Nothing but names, shapes and dtypes is read.
    """
    settings = SelectionSettings.create(
        ff, ffid, selector, include=include, exclude=exclude, block_pattern=block_pattern, **options
    )
    return settings.plan(model)


__all__ = [
    "DEFAULT_SELECTOR",
    "ROW_SELECTOR",
    "SELECTORS",
    "Option",
    "SelectionSettings",
    "Selector",
    "check_ff",
    "check_ffid",
    "get_selector",
    "plan",
    "selector_options",
]
