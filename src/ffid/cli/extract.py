"""``ffid extract``: the exact sparse difference between two checkpoints, as a delta file."""

from __future__ import annotations

import argparse
import sys

from ._selection import add_selection_arguments, selection_flags_given, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="write the delta that turns BASE into TUNED (merge it back to get TUNED bit for bit)",
        description=(
            "Compare BASE and TUNED tensor by tensor and write a delta file. By default every position whose "
            "value differs bit for bit is stored, so `ffid merge BASE DELTA` gives back TUNED exactly. With "
            "--ff/--ffid the delta holds the tuned values at that selection (as training would have saved); "
            "a change outside the selection is an error unless --outside warn. With --threshold only changes "
            "larger than T are kept (smaller file, no longer exact)."
        ),
    )
    p.add_argument(
        "base", metavar="BASE", help="base checkpoint: .safetensors, *.safetensors.index.json or model folder"
    )
    p.add_argument(
        "tuned",
        metavar="TUNED",
        help="finetuned checkpoint of the same model (either Wan or diffusers naming)",
    )
    p.add_argument(
        "-o", "--output", required=True, metavar="DELTA", help="delta file to write (.safetensors)"
    )
    add_selection_arguments(p, of_run=" (of the training run; restricts the delta to its selection)")
    p.add_argument(
        "--threshold", metavar="T", type=float, help="keep only positions where |tuned - base| > T"
    )
    p.add_argument(
        "--outside",
        choices=("error", "warn"),
        default="error",
        help="with --ff/--ffid: what a change outside the selection does (default: error)",
    )
    p.add_argument(
        "--value_dtype",
        "--value-dtype",
        "--save_precision",
        "--save-precision",
        dest="save_precision",
        default=None,
        help=(
            "dtype of the stored values: fp32, bf16, fp16 (default: fp32 with explicit indices, the base's "
            "dtype with implicit ones; both exact at strength 1 into that base)"
        ),
    )
    p.add_argument(
        "--indices",
        choices=("explicit", "implicit"),
        default="explicit",
        help=(
            "explicit (format 1, default): store every position; implicit (format 2, needs --ff/--ffid): "
            "values only, positions rebuilt from the base (about 4x smaller in bf16)"
        ),
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import extract_delta
    from ..checkpoint.files import Checkpoint
    from ..errors import ConfigError
    from ._progress import byte_progress

    selection = None
    if (args.ff is None) != (args.ffid is None):
        raise ConfigError("--ff and --ffid go together; give both to restrict to a selection, or neither")
    if args.ff is not None:
        if args.threshold is not None:
            raise ConfigError("give either --ff/--ffid or --threshold, not both")
        settings = settings_from_args(args)
        with Checkpoint(args.base) as ck:
            base_path = ck.path
        selection = settings.plan(str(base_path))
    elif selection_flags_given(args):
        raise ConfigError(f"{', '.join(selection_flags_given(args))} only apply with --ff and --ffid")
    with Checkpoint(args.base) as ck, Checkpoint(args.tuned) as tk:
        total = sum(s.size - s.data_start for s in ck.shards) + sum(s.size - s.data_start for s in tk.shards)
    with byte_progress(total, "extract", disable=args.quiet) as bar:
        result = extract_delta(
            args.base,
            args.tuned,
            args.output,
            selection=selection,
            threshold=args.threshold,
            outside=args.outside,
            save_dtype=args.save_precision,
            progress=bar,
            indices=args.indices,
        )
    for w in result.warnings:
        print(f"ffid extract: warning: {w}", file=sys.stderr)
    print(
        f"wrote {result.path} ({result.bytes_written:,} bytes): {result.elements:,} positions in "
        f"{result.tensors} tensors ({result.differing:,} differ from the base)"
    )
    return 0
