"""``ffid overlap``: pairwise shared elements between the selections of several ids."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import ConfigError
from ._selection import settings_from_args
from .plan import add_model_arguments, print_json

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_ids(text: str) -> list[int]:
    """``"1-8"`` -> 1..8, ``"1,3,5"`` -> [1, 3, 5], ``"0-3,7"`` -> [0, 1, 2, 3, 7] (sorted, unique)."""
    ids: set[int] = set()
    for part in str(text).split(","):
        m = _RANGE.match(part)
        if m is None:
            raise ConfigError(
                f"--ffids {text!r} is not a list of ids; write a range or a list, e.g. 1-8 or 1,3,5"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(
                f"--ffids {text!r}: range {part.strip()!r} runs backwards; write it low-high, e.g. 1-8"
            )
        if hi - lo > 4096:
            raise ConfigError(
                f"--ffids {text!r} names {hi - lo + 1} ids; compare at most a few dozen at once"
            )
        ids.update(range(lo, hi + 1))
    if len(ids) < 2:
        raise ConfigError(f"--ffids {text!r} names fewer than two ids; give at least two, e.g. 1-8")
    return sorted(ids)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "overlap",
        help="pairwise overlap between the selections of several ids (must be 0)",
        description="Plan one selection per id and count the elements each pair shares.",
    )
    add_model_arguments(p, ffid=False)
    p.add_argument(
        "--ffids", metavar="IDS", default="1-8", help="ids to compare: a range or list, e.g. 1-8, 1,3,5"
    )
    p.add_argument("--plain", action="store_true", help="plain text instead of a rich table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import report

    ids = parse_ids(args.ffids)
    settings = settings_from_args(args, ffid=ids[0])
    manifest = settings.manifest(args.model)  # read headers once for all ids
    selections = [settings.replace(ffid=i).plan(manifest) for i in ids]
    labels = [f"ffid {i}" for i in ids]
    mat = report.overlap_matrix(selections, labels)
    if args.plot:
        path = report.plot_coverage(selections, args.plot, labels)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        data = mat.to_dict()
        data.update(
            ffids=ids,
            selector=settings.selector,
            ff=settings.ff,
            selected=[s.selected for s in selections],
            total_params=manifest.total_params,
        )
        print_json(data)
    elif args.plain:
        sys.stdout.write(report.render_overlap_plain(mat))
    else:
        report.render_overlap_rich(mat)
    return 0
