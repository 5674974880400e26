"""``ffid merge``: bake delta files into a full checkpoint (streaming, same layout as the base)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="apply delta files to a base checkpoint and write the full merged model",
        description=(
            "Write BASE with every DELTA applied to OUT: same tensor names, dtypes, metadata and shard "
            "layout as BASE. Streams tensor by tensor (memory ~ one tensor). Each touched position becomes "
            "base + multiplier * (trained - base). Deltas made for another base, or overlapping each "
            "other, are refused before anything is written."
        ),
    )
    p.add_argument(
        "base", metavar="BASE", help="base checkpoint: .safetensors, *.safetensors.index.json or model folder"
    )
    p.add_argument(
        "deltas", metavar="DELTA", nargs="+", help="ffid delta files (from training or `ffid extract`)"
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help=(
            "output .safetensors file (a folder or *.index.json for a sharded base); never one of the inputs"
        ),
    )
    p.add_argument(
        "--multiplier",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="M",
        help=(
            "strength of the deltas: one value for all, or one per delta (default 1.0 = exactly the "
            "trained values)"
        ),
    )
    p.add_argument(
        "--dtype",
        metavar="D",
        help="cast float tensors of the output to bf16, fp16 or fp32 (default: keep the base's)",
    )
    p.add_argument(
        "--allow-overlap",
        action="store_true",
        help="allow deltas that touch the same positions; their changes are added up there",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the base fingerprint check (only if you know the delta fits this base)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import merge_checkpoint
    from ..checkpoint.files import Checkpoint
    from ._progress import byte_progress

    with Checkpoint(args.base) as ck:
        total = sum(s.size - s.data_start for s in ck.shards)
    with byte_progress(total, "merge", disable=args.quiet) as bar:
        result = merge_checkpoint(
            args.base,
            args.deltas,
            args.output,
            multipliers=args.multiplier,
            dtype=args.dtype,
            allow_overlap=args.allow_overlap,
            verify=not args.no_verify,
            progress=bar,
        )
    if result.overlap:
        print(
            f"overlap: {result.overlap:,} positions are touched by more than one delta; their changes "
            "were added"
        )
    if result.renamed:
        print(f"mapped {len(result.renamed)} tensor names between Wan and diffusers naming")
    print(
        f"wrote {', '.join(str(p) for p in result.outputs)} ({result.bytes_written:,} bytes): "
        f"{result.elements:,} positions in {result.tensors} tensors from {len(args.deltas)} delta(s)",
        file=sys.stdout,
    )
    return 0
