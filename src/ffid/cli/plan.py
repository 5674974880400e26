"""``ffid plan``: show which elements ``--ff`` / ``--ffid`` select in a model, without loading it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from ..errors import ConfigError
from ..presets import PRESETS
from ..select import get_selector
from ._selection import add_selection_arguments, settings_from_args

# The feature pass `ffid plan` estimates for a Wan DiT under a row selection: the seed's video
# (480x832, 81 frames) and two protected prompts (character 1's caption and one more).
PROJECTION_VIDEO = (480, 832)
PROJECTION_FRAMES = 81
PROJECTION_PROMPTS = 2

MODEL_HELP = (
    "a .safetensors file, a *.safetensors.index.json, a diffusers/transformers model folder, "
    f"or a preset: {', '.join(sorted(PRESETS))} (only headers are read)"
)


def add_model_arguments(p: argparse.ArgumentParser, *, ffid: bool = True) -> None:
    """Arguments shared by ``plan`` and ``overlap``: model, selection flags and output."""
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_selection_arguments(p, ffid=ffid)
    p.add_argument(
        "--block-pattern",
        metavar="RX",
        help="regex with one group capturing the block number, e.g. 'layers\\.(\\d+)\\.' "
        "(default: Wan, diffusers and LLM block containers)",
    )
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.add_argument("--plot", metavar="PNG", help="write a per-block coverage figure (png/svg/pdf)")


def int_option(value: str | None, flag: str, minimum: int = 0) -> int | None:
    """Parse an optional integer flag into an int, or raise a one-line :class:`ConfigError`."""
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(
            f"{flag} {value!r} is not an integer; give a whole number such as {max(minimum, 1)}"
        ) from None
    if number < minimum:
        raise ConfigError(f"{flag} {value!r} must be at least {minimum}")
    return number


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show which weights --ff/--ffid select (reads only headers)",
        description="Plan a selection: which elements of which tensors a run with --ff/--ffid trains. "
        "Only names and shapes are read; nothing is loaded.",
    )
    add_model_arguments(p)
    p.add_argument("--plain", action="store_true", help="plain text (block lines in the original log format)")
    p.add_argument("--list", action="store_true", help="list every tensor: name, shape, dtype, block")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import report
    from ..models import load_manifest

    if args.list:
        manifest = load_manifest(args.model, args.block_pattern)
        if args.json:
            print_json(
                {
                    "source": manifest.source,
                    "total_params": manifest.total_params,
                    "tensors": report.manifest_rows(manifest),
                }
            )
        else:
            sys.stdout.write(report.render_manifest_plain(manifest))
        return 0

    sel = settings_from_args(args).plan(args.model)
    if args.plot:
        path = report.plot_coverage([sel], args.plot)
        print(f"wrote {path}", file=sys.stderr)
    bases = cost = None
    if get_selector(sel.selector).whole_rows:  # what preserve_method = 'projection' trains
        from ..estimate.projection import projection_memory

        bases = projection_memory(sel)
        cost = _feature_pass(sel, args)
    if args.json:
        data = report.report_dict(sel)
        if bases is not None:
            data["projection_bases"] = dataclasses.asdict(bases)
        if cost is not None:
            data["feature_pass"] = dataclasses.asdict(cost)
        print_json(data)
        return 0
    if args.plain:
        sys.stdout.write(report.render_plain(sel))
    else:
        report.render_rich(sel)
    if bases is not None:
        print(bases.line())
    if cost is not None:
        print(cost.line())
    return 0


def _feature_pass(sel: Any, args: argparse.Namespace) -> Any:
    """The projection method's feature pass for a Wan DiT, at the seed's 480x832, 81 frames."""
    from ..estimate.projection import feature_pass_cost
    from ..models import load_manifest
    from ..presets.wan import wan_shape, wan_tokens

    shape = wan_shape(load_manifest(args.model, args.block_pattern))
    if shape is None:
        return None
    h, w = PROJECTION_VIDEO
    return feature_pass_cost(sel, shape, wan_tokens(shape, h, w, PROJECTION_FRAMES), PROJECTION_PROMPTS)
