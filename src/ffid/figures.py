"""Matplotlib figures written the ffid way: headless backend, atomic file writes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from .checkpoint.atomic import write_bytes_atomic
from .errors import ConfigError


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed).

    Raises ImportError when matplotlib is not installed; callers decide whether that is an error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], *, fmt: str = "png", dpi: int | None = None) -> Path:
    """Render ``fig`` to ``path`` atomically (temp file, fsync, rename), creating its folder, and close it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of {path} ({exc.strerror or exc}); choose another path"
        ) from None
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi)
    pyplot().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path
