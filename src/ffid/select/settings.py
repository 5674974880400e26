"""One object for what a run selects: :class:`SelectionSettings`.

``--ff``, ``--ffid``, the selector with its options, ``--include`` / ``--exclude`` and the block
pattern arrive through the CLI, ``ffid train``'s config, musubi-tuner's ``network_args``, the HF
and diffusers helpers and the demo. Each of them builds one :class:`SelectionSettings`, which
checks every value once, on creation, with the same one-line messages, and then plans with
:meth:`SelectionSettings.plan`. Nothing outside :mod:`ffid.select` names a selector or its options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..manifest import Manifest
from ..models import load_manifest
from ..names import compile_pattern, filter_names
from ..selection import Selection
from .base import Selector
from .registry import get_selector

DEFAULT_SELECTOR = "spread"


def check_ff(ff: Any) -> float:
    """Validate ``--ff``: a number with 0 < ff <= 1."""
    try:
        value = float(ff)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--ff {ff!r} is not a number; give a fraction such as 0.01 (1% of the model)"
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


def _patterns(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{what} {item!r} is not a string; give regexes such as 'blocks\\.0\\.'")
        compile_pattern(item, what)
    return items


@dataclass(frozen=True)
class SelectionSettings:
    """Everything that decides a selection, checked once when the object is made.

    ``options`` holds the selector's options as given (``slots``, ``seed`` for ``spread``);
    :attr:`resolved_options` fills in the defaults. Instances are immutable; :meth:`replace` makes
    a checked copy with some values changed.
    """

    ff: float
    ffid: int
    selector: str = DEFAULT_SELECTOR
    options: Mapping[str, Any] = field(default_factory=dict)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    block_pattern: str | None = None

    def __post_init__(self) -> None:
        # Normalise in place: a frozen dataclass may only do so through object.__setattr__.
        set_ = object.__setattr__
        set_(self, "ff", check_ff(self.ff))
        set_(self, "ffid", check_ffid(self.ffid))
        selector = get_selector(self.selector)
        given = dict(self.options or {})
        parsed = selector.parse_options(given)
        set_(self, "options", {k: parsed[k] for k in given})
        set_(self, "include", _patterns(self.include, "--include pattern"))
        set_(self, "exclude", _patterns(self.exclude, "--exclude pattern"))
        if self.block_pattern is not None:
            compile_pattern(self.block_pattern, "block pattern")
        selector.check_ffid(self.ffid, parsed)

    @classmethod
    def create(
        cls,
        ff: Any,
        ffid: Any,
        selector: str | None = None,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        block_pattern: str | None = None,
        option_flag: Callable[[str], str] | None = None,
        **options: Any,
    ) -> SelectionSettings:
        """Settings from loose values (strings from a command line or a config file are fine);
        options whose value is ``None`` count as not given. ``option_flag(name)`` spells a
        selector option in error messages the way the caller's user wrote it (default ``--name``)."""
        given = {k: v for k, v in options.items() if v is not None}
        if option_flag is not None and given:
            parsed = get_selector(selector or DEFAULT_SELECTOR).parse_options(given, option_flag)
            given = {k: parsed[k] for k in given}
        return cls(
            ff=ff,
            ffid=ffid,
            selector=selector or DEFAULT_SELECTOR,
            options=given,
            include=include or (),  # type: ignore[arg-type]
            exclude=exclude or (),  # type: ignore[arg-type]
            block_pattern=block_pattern,
        )

    @classmethod
    def from_selection(cls, sel: Selection) -> SelectionSettings:
        """The settings a selection was planned with (from ``sel.params``)."""
        selector = get_selector(sel.selector)
        params = dict(sel.params)
        options = {o.name: params[o.name] for o in selector.options if o.name in params}
        return cls(
            ff=params["ff"],
            ffid=params["ffid"],
            selector=sel.selector,
            options=options,
            include=tuple(params.get("include", ())),
            exclude=tuple(params.get("exclude", ())),
            block_pattern=sel.manifest.block_pattern,
        )

    @property
    def selector_object(self) -> Selector:
        """The registered :class:`~ffid.select.base.Selector` these settings name."""
        return get_selector(self.selector)

    @property
    def resolved_options(self) -> dict[str, int]:
        """Every option of the selector, with the defaults for those not given."""
        return self.selector_object.parse_options(self.options)

    def replace(self, **changes: Any) -> SelectionSettings:
        """A checked copy with ``changes`` applied (e.g. ``settings.replace(ffid=2)``)."""
        return dataclasses.replace(self, **changes)

    def manifest(self, model: Any) -> Manifest:
        """``model``'s manifest (module, file, folder, preset or manifest) under the block pattern."""
        return load_manifest(model, self.block_pattern)

    def eligible(self, manifest: Manifest) -> list[str]:
        """Names of ``manifest`` the selector may pick from (after include/exclude)."""
        return filter_names(manifest.names, self.include or None, self.exclude or None)

    def plan(self, model: Any) -> Selection:
        """The selection these settings make on ``model`` (only names, shapes and dtypes are read)."""
        manifest = self.manifest(model)
        sel = self.selector_object.select(
            manifest, ff=self.ff, ffid=self.ffid, names=self.eligible(manifest), options=self.resolved_options
        )
        if self.include:
            sel.params["include"] = list(self.include)
        if self.exclude:
            sel.params["exclude"] = list(self.exclude)
        return sel

    def capacity(self, manifest: Manifest) -> int | None:
        """Elements this id can hold in ``manifest`` (``None``: only the model's size limits it)."""
        return self.selector_object.capacity(
            manifest, self.eligible(manifest), self.ffid, self.resolved_options
        )

    def ids(self) -> int:
        """How many disjoint ids the layout has."""
        return self.selector_object.ids(self.resolved_options)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the inverse of ``SelectionSettings(**d)``)."""
        return {
            "ff": self.ff,
            "ffid": self.ffid,
            "selector": self.selector,
            "options": dict(self.options),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "block_pattern": self.block_pattern,
        }

    def describe(self) -> str:
        """``spread slots=16 seed=0 ff=0.01 ffid=1``: one line for logs and summaries."""
        return f"{self.selector_object.describe(self.resolved_options)} ff={self.ff:g} ffid={self.ffid}"
