"""The selection flags every command shares, and the one :class:`SelectionSettings` made from them.

The selector options (``--slots``, ``--seed``, ...) come from the registered selectors, so a new
selector's options appear here without touching any command.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from ..select import DEFAULT_SELECTOR, SELECTORS, SelectionSettings
from ..select import selector_options as registered_options


def _option_flags() -> dict[str, tuple[str, str]]:
    """Option name -> (metavar, help) over every registered selector."""
    return {
        name: (name.upper(), f"{', '.join(owners)}: {opt.help} (default {opt.default})")
        for name, (opt, owners) in registered_options().items()
    }


def add_selection_arguments(
    p: argparse.ArgumentParser, *, ff: bool = True, ffid: bool = True, of_run: str = ""
) -> None:
    """``--ff``, ``--ffid``, ``--selector``, the selector options, ``--include``/``--exclude``.

    ``of_run`` (e.g. ``" of the training run"``) is appended to the help of commands that
    re-create the selection of an earlier run.
    """
    if ff:
        p.add_argument(
            "--ff", metavar="F", help=f"fraction of all parameters to train, 0 < F <= 1 (e.g. 0.01){of_run}"
        )
    if ffid:
        p.add_argument(
            "--ffid", metavar="N", help=f"selection id; different ids never share an element{of_run}"
        )
    p.add_argument(
        "--selector",
        default=None,
        help="; ".join(f"{s.name}: {s.help}" for s in SELECTORS.values()) + f" (default: {DEFAULT_SELECTOR})",
    )
    for name, (metavar, text) in _option_flags().items():
        p.add_argument(f"--{name}", metavar=metavar, help=text + of_run)
    p.add_argument(
        "--include",
        metavar="RX",
        action="append",
        help=f"train only tensors matching this regex (repeatable){of_run}",
    )
    p.add_argument(
        "--exclude",
        metavar="RX",
        action="append",
        help=f"skip tensors matching this regex (repeatable){of_run}",
    )


def selection_flags_given(args: argparse.Namespace) -> list[str]:
    """Selection flags besides ``--ff``/``--ffid`` that were given (they need ``--ff``)."""
    given = [f"--{n}" for n in _option_flags() if getattr(args, n, None) is not None]
    given += [f"--{n}" for n in ("selector", "include", "exclude") if getattr(args, n, None)]
    return given


def selector_options(args: argparse.Namespace) -> dict[str, Any]:
    """The selector options given on the command line (checked by :class:`SelectionSettings`)."""
    return {n: getattr(args, n) for n in _option_flags() if getattr(args, n, None) is not None}


def settings_from_args(args: argparse.Namespace, ffid: Any = None) -> SelectionSettings:
    """The :class:`SelectionSettings` of the command line (``ffid`` overrides ``--ffid``)."""
    if args.ff is None:
        raise ConfigError(
            f"--ff is required for `ffid {args.command}`; give the fraction to train, e.g. --ff 0.01"
        )
    if ffid is None:
        ffid = getattr(args, "ffid", None)
        if ffid is None:
            raise ConfigError(
                f"--ffid is required for `ffid {args.command}`; give a selection id, e.g. --ffid 1"
            )
    options = selector_options(args)
    return SelectionSettings.create(
        args.ff,
        ffid,
        args.selector,
        include=args.include,
        exclude=args.exclude,
        block_pattern=getattr(args, "block_pattern", None),
        **options,
    )
