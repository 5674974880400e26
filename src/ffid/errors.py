"""The exceptions ffid raises.

Every message says what is wrong, why it matters and how to fix it, in one line, so the CLI can
print it as is. Messages quote text read from files (tensor names, fingerprints, metadata), so
every message is made :func:`printable` when the error is made: a crafted file cannot send
terminal escapes through an error, whichever code raised it. Subclasses also derive from the
closest built-in exception so that callers who catch ``ValueError`` or ``FileNotFoundError``
keep working.
"""

from __future__ import annotations

from collections.abc import Iterable


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control, format and separator characters escaped.

    Escape sequences (``\\x1b[...``, the one-byte CSI ``\\x9b``), newlines, carriage returns and
    bidi overrides from a file's metadata would otherwise move the cursor, recolour or fake
    output lines; they are shown as ``\\xNN`` / ``\\uNNNN`` instead.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class FfidError(Exception):
    """Base class of every error ffid raises on purpose (bad input, bad files, misuse).

    String arguments are made :func:`printable`, so no message carries raw control characters.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


class ConfigError(FfidError, ValueError):
    """A value given by the user (``--ff``, ``--ffid``, a pattern, a config key) is not usable."""


class ModelFileError(FfidError, OSError):
    """A model, checkpoint or delta file is missing, truncated, corrupt or not what was expected."""


class MissingFileError(ModelFileError, FileNotFoundError):
    """A path the user named does not exist."""


class CapacityError(ConfigError):
    """The requested fraction does not fit the slot layout of the selector."""


class MismatchError(FfidError, ValueError):
    """A selection, delta or state was made for a different model than the one at hand."""


class AttachError(FfidError, RuntimeError):
    """The engine cannot attach to (or detach from) a model in its current state."""


class TrainingError(FfidError, RuntimeError):
    """Training cannot go on: NaN/inf values, an unusable optimizer setup, a broken resume."""


def did_you_mean(value: object, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """``"did you mean 'x'? "`` for the choice closest to ``value``, or ``""`` when none is close.

    Every "unknown name" message uses it, so suggestions read the same everywhere.
    """
    import difflib

    near = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=cutoff)
    return f"did you mean {near[0]!r}? " if near else ""
