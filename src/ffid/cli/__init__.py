"""The ``ffid`` command line: a thin layer over the library.

Each command lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` to a function ``(args) -> int``. Modules are found
automatically, so adding a command never touches this file.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import pkgutil
import re
import sys
import traceback
from collections.abc import Sequence

from .._version import __version__
from ..errors import FfidError

# Values argparse would take for flags: "-inf", "-nan", "-1e-3" are numbers here, so "--ff -inf"
# reaches the command's own check instead of "expected one argument".
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _UsageError(Exception):
    """A command line argparse refuses; printed as one line by :func:`main`."""


class FfidArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and numbers like ``-inf`` taken as values."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {' '.join(message.split())}; see {self.prog} --help")


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return None


def _unknown_message(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    """One line for arguments no command takes, suggesting the nearest flag for a misspelt one."""
    sub = _subparser(parser, command) or parser
    prog = sub.prog
    flag = next((e.split("=", 1)[0] for e in extras if e.startswith("--")), None)
    if flag is not None:
        near = difflib.get_close_matches(flag, _option_strings(sub), n=1, cutoff=0.6)
        hint = f"did you mean {near[0]}?" if near else f"see {prog} --help"
        return f"{prog}: error: unknown flag {flag}; {hint}"
    return f"{prog}: error: unexpected argument {extras[0]!r}; see {prog} --help"


def _quiet_stdout() -> None:
    """After a broken pipe (``ffid inspect ... | head -1``), send the rest of stdout nowhere."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every command module registered."""
    parser = FfidArgumentParser(
        prog="ffid",
        description="Selective full finetuning: train an exact, disjoint fraction of a model's own weights.",
    )
    parser.add_argument("--version", action="version", version=f"ffid {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ffid`` command line; returns the process exit code."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            raise _UsageError(_unknown_message(parser, getattr(args, "command", None), extras))
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (| head): not an error of ours
        return 0
    except FfidError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ffid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ffid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
