"""``ffid convert``: rewrite a delta with explicit or implicit indices and another value dtype."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="rewrite a delta with explicit (format 1) or implicit (format 2) indices, other values, or "
        "without its stored text encodings",
        description=(
            "Write DELTA to OUT with --indices explicit (every position stored, format 1) or implicit "
            "(values only, positions rebuilt from the base's shapes, format 2). The positions never change: "
            "an explicit delta becomes implicit only if its stored positions are exactly those its "
            "selection plans. The base's shapes come from --base, or from the built-in preset the delta was "
            "planned on. --drop_text leaves out the text encodings a Wan run stored."
        ),
    )
    p.add_argument("delta", metavar="DELTA", help="the ffid delta file to convert")
    p.add_argument(
        "--indices",
        choices=("explicit", "implicit"),
        help="index layout of the output (default: the input's)",
    )
    p.add_argument(
        "--value_dtype",
        "--value-dtype",
        dest="value_dtype",
        choices=("fp32", "bf16", "fp16"),
        help="dtype of the output's values (default: the input's); narrowing rounds them",
    )
    p.add_argument(
        "--base",
        metavar="BASE",
        help="the base model (.safetensors, *.index.json or folder); needed for implicit input or output "
        "unless the delta was planned on a built-in preset",
    )
    p.add_argument(
        "--drop_text",
        "--drop-text",
        dest="drop_text",
        action="store_true",
        help="leave out the stored text encodings (ffid.text.*); a later protected run then needs "
        "the prompts' encodings from a cache (preserve_cache) or re-encodes the recorded prompts",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="delta file to write (.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import convert_delta

    base = None
    if args.base is not None:
        from ..checkpoint.files import Checkpoint

        with Checkpoint(args.base) as ck:  # the same reader merge uses: one naming of errors
            base = ck.path
    result = convert_delta(
        args.delta,
        args.output,
        indices=args.indices,
        value_dtype=args.value_dtype,
        base=base,
        drop_text=args.drop_text,
    )
    dropped = f"; {result.text_dropped} stored text encodings left out" if result.text_dropped else ""
    print(
        f"wrote {result.path} ({result.bytes_written:,} bytes, was {result.bytes_in:,}): {result.elements:,} "
        f"{result.value_dtype} values in {result.tensors} tensors, {result.indices} indices{dropped}"
    )
    return 0
