"""``ffid estimate``: GPU and host memory a run needs, from the model's header, before training."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import ConfigError
from ._selection import add_selection_arguments, selector_options
from .plan import MODEL_HELP, int_option, print_json


def _float_option(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r} is not a number; give e.g. {flag} 6.5") from None


def register(subparsers: Any) -> None:
    from ..estimate import ESTIMATE_BASES, OPTIMIZERS

    p = subparsers.add_parser(
        "estimate",
        help="GPU/host memory and delta size for each --ff, from the header alone",
        description="Estimate GPU memory, host RAM and delta file size of a run for each --ff value. "
        "The selection is planned exactly (only names, shapes and dtypes are read); each figure is "
        "broken down into base weights, proxies, indices, gradients, optimizer state and workspace. "
        "Activations are not known from a header: give --activations-gb, or --video_size/--frames "
        "for a rough Wan estimate.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--ff", metavar="F", nargs="+", required=True, help="one or more fractions to train, e.g. 0.001 0.01"
    )
    p.add_argument(
        "--ffid", metavar="N", default="0", help="selection id (memory hardly depends on it; default 0)"
    )
    add_selection_arguments(p, ff=False, ffid=False)
    p.add_argument("--block-pattern", metavar="RX", help="regex with one group capturing the block number")
    p.add_argument(
        "--optimizer",
        "--optimizer_type",
        dest="optimizer",
        default="adamw",
        help="; ".join(f"{k}: {o.description}" for k, o in OPTIMIZERS.items()) + " (default adamw)",
    )
    p.add_argument(
        "--base-dtype",
        "--base_dtype",
        dest="base_dtype",
        metavar="DT",
        help=f"dtype the base weights are held in: {', '.join(ESTIMATE_BASES)} (default: as stored in the "
        "file; fp8 is musubi's --fp8_base: the whole model in float8_e4m3fn; fp8-scaled is "
        "--fp8_base --fp8_scaled)",
    )
    p.add_argument(
        "--fp8_scaled",
        "--fp8-scaled",
        dest="fp8_scaled",
        action="store_true",
        help="musubi's --fp8_scaled: block Linear weights in fp8 with bf16 scales per 64 columns "
        "(same as --base-dtype fp8-scaled)",
    )
    p.add_argument(
        "--dit_high_noise",
        "--dit-high-noise",
        dest="dit_high_noise",
        metavar="PATH",
        nargs="?",
        const="",
        help="Wan 2.2 A14B: train both experts in one run, as musubi's --dit_high_noise; the "
        "high-noise expert's file is optional (its header is checked to match MODEL)",
    )
    p.add_argument(
        "--offload_inactive_dit",
        "--offload-inactive-dit",
        dest="offload_inactive_dit",
        action="store_true",
        help="with --dit_high_noise and no block swap: keep the inactive expert in host RAM",
    )
    p.add_argument(
        "--gpu-gb",
        "--gpu_gb",
        dest="gpu_gb",
        metavar="GIB",
        help="the card's memory in GiB (e.g. 24): also print the fewest --blocks_to_swap that fit it, "
        "with 1 GiB kept for the CUDA context",
    )
    p.add_argument(
        "--blocks_to_swap",
        "--blocks-to-swap",
        dest="blocks_to_swap",
        metavar="N",
        default="0",
        help="park the last N blocks in host RAM and stream them (musubi-tuner's block swap)",
    )
    p.add_argument(
        "--activations-gb",
        "--activations_gb",
        dest="activations_gb",
        metavar="GIB",
        help="activation memory to add, in GiB (measure it once, or use --video_size/--frames)",
    )
    p.add_argument(
        "--video_size",
        "--video-size",
        dest="video_size",
        metavar=("H", "W"),
        nargs=2,
        help="Wan only: video height and width for a rough activation estimate",
    )
    p.add_argument(
        "--frames", "--video_length", dest="frames", metavar="F", help="Wan only: frames per video (4n+1)"
    )
    p.add_argument(
        "--batch_size",
        "--batch-size",
        dest="batch_size",
        metavar="B",
        default="1",
        help="videos per step for the Wan activation estimate (default 1)",
    )
    p.add_argument(
        "--grad_path",
        "--grad-path",
        dest="grad_path",
        choices=("auto", "sampled", "dense", "chunked"),
        default="auto",
        help="the engine's proxy-gradient path whose transient counts in the workspace (default auto: "
        "the largest it may choose; see docs/engine.md)",
    )
    p.add_argument(
        "--captions",
        metavar="N",
        default="0",
        help="Wan: captions of the run, whose text encodings each delta stores (the first 64) and the "
        "delta file size then counts (default 0: left out, with a note)",
    )
    p.add_argument(
        "--caption_tokens",
        "--caption-tokens",
        dest="caption_tokens",
        metavar="T",
        default="512",
        help="umT5 tokens of a typical caption (default 512, the most umT5 keeps: an upper bound)",
    )
    p.add_argument("--json", action="store_true", help="print everything as JSON (sizes in bytes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..estimate import estimate, format_estimates

    base_dtype = args.base_dtype
    if args.fp8_scaled:
        if base_dtype is not None and base_dtype.lower().replace("_", "-") not in ("fp8", "fp8-scaled"):
            raise ConfigError(
                f"--fp8_scaled with --base-dtype {base_dtype}: fp8_scaled is an fp8 base; drop --base-dtype"
            )
        base_dtype = "fp8-scaled"
    high = args.dit_high_noise
    video_size = None
    if args.video_size is not None:
        video_size = [int_option(v, "--video_size", 1) for v in args.video_size]
    estimates = estimate(
        args.model,
        args.ff,
        ffid=int_option(args.ffid, "--ffid", 0) or 0,
        selector=args.selector,
        include=args.include,
        exclude=args.exclude,
        block_pattern=args.block_pattern,
        optimizer=args.optimizer,
        base_dtype=base_dtype,
        blocks_to_swap=int_option(args.blocks_to_swap, "--blocks_to_swap", 0) or 0,
        activations_gb=_float_option(args.activations_gb, "--activations-gb"),
        video_size=video_size,  # type: ignore[arg-type]
        frames=int_option(args.frames, "--frames", 1),
        batch_size=int_option(args.batch_size, "--batch_size", 1) or 1,
        grad_path=args.grad_path,
        experts=1 if high is None else 2,
        dit_high_noise=high or None,
        offload_inactive_dit=args.offload_inactive_dit,
        gpu_gb=_float_option(args.gpu_gb, "--gpu-gb"),
        captions=int_option(args.captions, "--captions", 0) or 0,
        caption_tokens=int_option(args.caption_tokens, "--caption_tokens", 1) or 1,
        **selector_options(args),
    )
    if args.json:
        print_json({"model": str(args.model), "estimates": [e.to_dict() for e in estimates]})
    else:
        sys.stdout.write(format_estimates(estimates, str(args.model)) + "\n")
    return 0
