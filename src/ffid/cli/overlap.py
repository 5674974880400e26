"""``ffid overlap``: pairwise shared elements between the selections of several ids."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import ConfigError
from .plan import add_model_arguments, print_json, require_ff, selector_options

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
    add_model_arguments(p)
    p.add_argument(
        "--ffids", metavar="IDS", default="1-8", help="ids to compare: a range or list, e.g. 1-8, 1,3,5"
    )
    p.add_argument("--plain", action="store_true", help="plain text instead of a rich table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import report
    from ..models import load_manifest
    from ..select import plan

    ff = require_ff(args)
    ids = parse_ids(args.ffids)
    options = selector_options(args)
    manifest = load_manifest(args.model, args.block_pattern)  # read headers once for all ids
    selections = [
        plan(manifest, ff, i, args.selector, include=args.include, exclude=args.exclude, **options)
        for i in ids
    ]
    labels = [f"ffid {i}" for i in ids]
    mat = report.overlap_matrix(selections, labels)
    if args.plot:
        path = report.plot_coverage(selections, args.plot, labels)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        data = mat.to_dict()
        data.update(
            ffids=ids,
            selector=args.selector,
            ff=selections[0].params["ff"],
            selected=[s.selected for s in selections],
            total_params=manifest.total_params,
        )
        print_json(data)
    elif args.plain:
        sys.stdout.write(report.render_overlap_plain(mat))
    else:
        report.render_overlap_rich(mat)
    return 0
