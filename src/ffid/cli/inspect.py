"""``ffid inspect``: what a delta file or a checkpoint holds."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help=(
            "show what a delta or checkpoint holds (selector, ff, ffid, counts per block, "
            "fingerprints, metadata)"
        ),
        description=(
            "For an ffid delta: selector, ff, ffid, fingerprints, selected elements per block and the "
            "training "
            "metadata. For a checkpoint (file, index or model folder): tensors, parameters, dtypes, blocks, "
            "metadata. Only headers are read."
        ),
    )
    p.add_argument(
        "file", metavar="FILE", help="a delta or checkpoint (.safetensors, *.index.json, model folder)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import format_inspect, inspect_file

    report = inspect_file(args.file)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0
