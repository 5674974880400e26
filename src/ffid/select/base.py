"""What a selector is: an object that knows its options, its ids and its capacity.

Callers never name a selector. They hold a :class:`Selector` (from the registry in
:mod:`ffid.select`) and ask it: which options it takes (:attr:`Selector.options`), how many
disjoint ids a layout has (:meth:`Selector.ids`), how many elements an id can hold
(:meth:`Selector.capacity`), and for a :class:`~ffid.selection.Selection`.
To add a selector, subclass :class:`Selector` in a new module of this package and register an
instance in ``SELECTORS`` (``ffid/select/registry.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, did_you_mean
from ..manifest import Manifest
from ..selection import Selection


@dataclass(frozen=True)
class Option:
    """One option of a selector: a bounded integer (every option so far is one).

    ``maximum`` keeps absurd values out before any work starts: planning and the capacity search
    walk the layout, so a value such as ``--slots 100000000`` ran for hours instead of failing.
    """

    name: str
    default: int
    minimum: int
    help: str
    maximum: int | None = None

    def parse(self, value: Any, flag: str | None = None) -> int:
        """``value`` as a valid integer, or a one-line :class:`ConfigError` naming the option as
        ``flag`` (default ``--<name>``; clients pass their own spelling, e.g. ``network_args slots``)."""
        flag = flag or f"--{self.name}"
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(
                f"{flag} {value!r} is not an integer; give a whole number such as {self.default}"
            )
        try:
            number = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        except ValueError:
            raise ConfigError(
                f"{flag} {value!r} is not an integer; give a whole number such as {self.default}"
            ) from None
        if number < self.minimum:
            raise ConfigError(f"{flag} {value!r} must be at least {self.minimum} ({self.help})")
        if self.maximum is not None and number > self.maximum:
            raise ConfigError(
                f"{flag} {number} is too large: give at most {self.maximum:,} ({self.help}; "
                f"the default is {self.default})"
            )
        return number


class Selector:
    """Base class of the selection algorithms (``spread``, ``compat-v2``).

    Subclasses set :attr:`name`, :attr:`help`, :attr:`options` and implement :meth:`select`,
    :meth:`ids` and :meth:`capacity`.
    """

    name: str = ""
    help: str = ""
    options: tuple[Option, ...] = ()
    whole_rows: bool = False  # every selection is whole rows of 2-D tensors (projection can use it)
    # Version of the rule that turns (shapes, options, ff, ffid) into positions. Delta files without
    # indices (format 2) record it and are rebuilt only by the same version, so a released layout
    # never changes: a different rule is a new version (tests/test_layout_pins.py pins each one).
    layout_version: int = 1

    def parse_options(
        self, given: Mapping[str, Any], flag: Callable[[str], str] | None = None
    ) -> dict[str, int]:
        """Validate ``given`` and return every option with its value (defaults filled in);
        ``flag(name)`` spells an option in error messages."""
        known = {o.name: o for o in self.options}
        if given and not known:
            raise ConfigError(
                f"{self.name} takes no options ({', '.join(given)} given); drop them or choose a selector "
                "that has them"
            )
        for key in given:
            if key not in known:
                raise ConfigError(
                    f"selector {self.name!r} has no option {key!r}; {did_you_mean(key, known)}"
                    f"it takes {', '.join(known)}"
                )
        return {
            name: opt.parse(given[name], flag(name) if flag else None) if name in given else opt.default
            for name, opt in known.items()
        }

    def ids(self, options: Mapping[str, int]) -> int:
        """How many disjoint ids (``0 .. ids-1``) the layout given by ``options`` has."""
        raise NotImplementedError

    def check_ffid(self, ffid: int, options: Mapping[str, int]) -> None:
        """Raise a one-line :class:`ConfigError` when ``ffid`` is not an id of the layout."""
        raise NotImplementedError

    def select(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], options: Mapping[str, int]
    ) -> Selection:
        """The selection of ``ff`` of ``manifest``'s parameters for id ``ffid`` among ``names``."""
        raise NotImplementedError

    def capacity(
        self, manifest: Manifest, names: list[str], ffid: int, options: Mapping[str, int]
    ) -> int | None:
        """Elements id ``ffid`` can hold over ``names`` (``None``: only the model's size limits it)."""
        return None

    def fitting_options(
        self, manifest: Manifest, names: list[str], ff: float, ffid: int, options: Mapping[str, int]
    ) -> dict[str, int] | None:
        """Options of the nearest layout in which ``ff`` fits for ``ffid``, or ``None``.

        Used where only the amount matters (memory estimates), never to train: selections of
        different layouts are not disjoint.
        """
        return None

    @property
    def layout(self) -> str:
        """``spread/1``: the selector and the version of its layout rule, as delta files record it."""
        return f"{self.name}/{self.layout_version}"

    def describe(self, options: Mapping[str, int]) -> str:
        """``spread slots=16 seed=0``: the selector and its options, for logs and errors."""
        return " ".join([self.name, *(f"{k}={v}" for k, v in options.items())])
