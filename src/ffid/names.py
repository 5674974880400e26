"""Canonical tensor names, block detection and the one pattern syntax of ffid.

The same weight must get the same selection however the model was loaded (compiled, wrapped
in DDP, saved by ComfyUI with a ``model.diffusion_model.`` prefix, ...), so every name goes
through :func:`canonical_name` before anything else looks at it.

Patterns (``--include``, ``--exclude``, ``--block-pattern``) are Python regular expressions
*searched* in the canonical name: ``modulation`` matches any name containing it, ``^head\\.``
only names starting with ``head.``. There is no second (glob) syntax.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ConfigError, printable  # noqa: F401 - re-exported: names.printable

# Prefixes added by wrappers or by checkpoint formats, never part of the model's own naming.
# Order matters only for readability: stripping repeats until none applies.
_WRAPPER_PREFIXES = (
    "_orig_mod.",  # torch.compile
    "module.",  # DataParallel / DDP
    "model.diffusion_model.",  # ComfyUI / original SD-style checkpoints
    "base_model.model.",  # PEFT wrappers
)
# Components inserted in the middle of names by activation-checkpoint and FSDP wrappers.
_WRAPPER_INFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")

# Containers whose numbered children are the repeated blocks of a model.
DEFAULT_BLOCK_PATTERN = r"(?:^|\.)(?:blocks|transformer_blocks|single_transformer_blocks|layers|h)\.(\d+)\."


def canonical_name(name: str) -> str:
    """Return ``name`` without wrapper prefixes/infixes (``module.``, ``_orig_mod.``, ...)."""
    for infix in _WRAPPER_INFIXES:
        name = name.replace("." + infix, ".")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def compile_pattern(pattern: str, what: str = "pattern") -> re.Pattern[str]:
    """Compile one user pattern, turning a regex syntax error into a :class:`ConfigError`."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"{what} {pattern!r} is not a valid regular expression ({exc}); patterns are Python "
            "regexes searched in tensor names, e.g. 'modulation' or '^blocks\\.[0-9]+\\.ffn'"
        ) from None


@dataclass(frozen=True, order=True)
class BlockKey:
    """A repeated block: ``group``, the container path (``model.layers``), and ``index``, its number."""

    group: str
    index: int

    def label(self, single_group: bool = True) -> str:
        """Short label for tables: ``03`` when the model has one block group, else ``group.03``."""
        return f"{self.index:02d}" if single_group else f"{self.group}.{self.index:02d}"


class BlockFinder:
    """Maps canonical names to their :class:`BlockKey` (or ``None`` outside the blocks)."""

    def __init__(self, pattern: str | None = None):
        self.pattern_text = pattern or DEFAULT_BLOCK_PATTERN
        self._re = compile_pattern(self.pattern_text, "block pattern")
        if self._re.groups < 1:
            raise ConfigError(
                f"block pattern {self.pattern_text!r} has no capturing group; put the block number in "
                "one group, e.g. 'layers\\.(\\d+)\\.'"
            )

    def __call__(self, name: str) -> BlockKey | None:
        m = self._re.search(name)
        if m is None:
            return None
        digits = m.group(1)
        if digits is None or not digits.isdigit():
            return None
        group = name[: m.start(1)].rstrip(".")
        return BlockKey(group, int(digits))


def near_misses(pattern: str, names: Iterable[str], limit: int = 5) -> list[str]:
    """Names (or name components) that look like ``pattern``, for error messages."""
    names = list(names)
    plain = re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern)
    components = sorted({c for n in names for c in n.split(".") if not c.isdigit()})
    close = difflib.get_close_matches(plain, components, n=limit, cutoff=0.5)
    if len(close) < limit:
        close += [n for n in difflib.get_close_matches(plain, names, n=limit, cutoff=0.4) if n not in close][
            : limit - len(close)
        ]
    return close


def filter_names(
    names: Sequence[str],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[str]:
    """Keep names matching any ``include`` pattern (all when none) and no ``exclude`` pattern.

    A pattern that matches no name at all is an error listing near misses: a filter that
    silently matches nothing is the most common way to train something else than intended.
    """
    kept = list(names)
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for text in patterns or ():
            rx = compile_pattern(text, f"{flag} pattern")
            if not any(rx.search(n) for n in names):
                hints = near_misses(text, names)
                hint = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
                raise ConfigError(
                    f"{flag} pattern {text!r} matches no tensor of the model{hint} "
                    "(patterns are regexes searched in canonical names; see `ffid plan MODEL --list`)"
                )
    if include:
        rxs = [re.compile(p) for p in include]
        kept = [n for n in kept if any(r.search(n) for r in rxs)]
    if exclude:
        rxs = [re.compile(p) for p in exclude]
        kept = [n for n in kept if not any(r.search(n) for r in rxs)]
    if not kept:
        raise ConfigError(
            "the --include/--exclude patterns leave no tensor to train; loosen them "
            "(`ffid plan MODEL --list` prints every tensor name)"
        )
    return kept
