"""``python -m ffid.demo.ship_base``: pretrain the demo's base and write it, with its info, into
the package's ``bases/`` (see :func:`ffid.demo.shipped.regenerate`). A module of its own so that
running it does not import :mod:`ffid.demo.shipped` twice (``ffid.demo`` imports that one)."""

from __future__ import annotations

from .shipped import main

if __name__ == "__main__":
    main()
