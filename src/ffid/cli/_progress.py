"""A byte-counting progress bar for the streaming checkpoint commands (tqdm on stderr, off when not a tty)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def byte_progress(total: int, desc: str, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``update(nbytes)``; shows a tqdm bar only on an interactive stderr."""
    if disable or not sys.stderr.isatty():
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        yield bar.update
