"""``ffid demo``: the seed's two-character story on a tiny Wan and real digits, in one command."""

from __future__ import annotations

import argparse
from typing import Any

STACKINGS = ("sequential", "parallel")  # ffid.demo.config.STACKINGS (not imported: a light CLI)
# flags of the two-character demo that mean nothing with --characters, and the reverse
TWO_CHARACTER_FLAGS = ("character1", "character2", "ffid1", "ffid2", "character2_mode")
STACK_FLAGS = ("stacking", "held_out", "character_samples")

DEFAULTS_NOTE = (
    "defaults: the full demo on the base shipped with ffid (about 4 minutes on one thread here; "
    "--fresh, another seed or another base setting pretrains its base first, 4-6 minutes more); "
    "--quick: a short smoke run"
)


def register(subparsers: Any) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="pretrain a tiny Wan on real digits, teach two characters into --ffid 1 and 2, merge, report",
        description=(
            "Pretrain a small Wan-architecture DiT (diffusers WanTransformer3DModel) on scikit-learn's "
            "handwritten digits, teach 'character1' and then 'character2' (two held-out digits; character2 "
            "three ways from the same state: plain, with character1 rehearsed, and preserved without "
            "character1's data) with "
            "--ff into two disjoint ids through the ffid trainer, merge both deltas into a full "
            "checkpoint, sample every prompt at every stage and judge the samples with a classifier "
            "trained on the real digits. --characters 7 4 1 stacks N characters into ids 1..N instead "
            "(sequential with preservation and a plain contrast, or --stacking parallel then merged). "
            "CPU only, no network. " + DEFAULTS_NOTE
        ),
    )
    p.add_argument(
        "--output_dir",
        default="ffid-demo",
        help="folder for everything the demo writes (default ./ffid-demo)",
    )
    p.add_argument(
        "--cache_dir", default=None, help="where the pretrained base is cached (default {output_dir}/base)"
    )
    p.add_argument(
        "--fresh", action="store_true", help="pretrain the base again even if a shipped or cached one matches"
    )
    p.add_argument(
        "--quick", action="store_true", help="a shortened demo: smaller model, few steps (for tests)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of everything (same seed, same numbers; default 0)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (fixed for reproducibility; default 1: on a busy machine more threads spin and "
        "slow down)",
    )
    p.add_argument("--selector", default=None, help="selection algorithm: spread (default) or compat-v2")
    p.add_argument(
        "--ff", type=float, default=None, help="fraction of the model each character trains (default 0.01)"
    )
    p.add_argument("--ffid1", type=int, default=None, help="selection id of character1 (default 1)")
    p.add_argument("--ffid2", type=int, default=None, help="selection id of character2 (default 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per character")
    p.add_argument("--learning_rate", type=float, default=None, help="learning rate of the character runs")
    p.add_argument("--batch_size", type=int, default=None, help="batch size of the character runs")
    p.add_argument(
        "--prior_per_class",
        type=int,
        default=None,
        help="real scans of each base class mixed into a character's data as regularisation "
        "(0: none; default 23)",
    )
    p.add_argument(
        "--character2_mode",
        choices=("all", "plain", "rehearsed", "preserved"),
        default=None,
        help="how character2 is taught on top of character1: plain (its own data only), rehearsed "
        "(character1's scans mixed into its data), preserved (no character1 data; a preservation "
        "loss keeps base + character1's predictions; recommended) or all three from the same state, "
        "side by side (default all; the merged checkpoint takes the preserved one)",
    )
    p.add_argument(
        "--preserve_weight", type=float, default=None, help="weight of the preservation loss (default 16)"
    )
    p.add_argument(
        "--preserve_items",
        type=int,
        default=None,
        help="protected pure-noise inputs per step in the preserved run (default 8)",
    )
    p.add_argument(
        "--preserve_method",
        default=None,
        help="how the preserved run keeps earlier characters: loss (default) or projection (every "
        "trained row's change kept off the inputs its layers see for the protected prompts; its own "
        "recipe: whole rows of the blocks' Linears, --projection_ff, --projection_lr)",
    )
    p.add_argument("--projection_ff", type=float, default=None, help="projection's budget (default 0.05)")
    p.add_argument(
        "--projection_lr", type=float, default=None, help="projection's learning rate (default 3e-3)"
    )
    p.add_argument(
        "--preserve_energy",
        type=float,
        default=None,
        help="projection: share of the sampled protected inputs' energy kept (default 0.99)",
    )
    p.add_argument("--pretrain_steps", type=int, default=None, help="steps of base pretraining")
    p.add_argument("--pretrain_lr", type=float, default=None, help="learning rate of base pretraining")
    p.add_argument("--character1", type=int, default=None, help="digit that plays character1 (default 7)")
    p.add_argument("--character2", type=int, default=None, help="digit that plays character2 (default 4)")
    p.add_argument("--samples", type=int, default=None, help="samples per prompt used for the scores")
    p.add_argument("--sample_steps", type=int, default=None, help="Euler steps per sample")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    g = p.add_argument_group(
        "stacking N characters",
        "--characters 7 4 1 teaches digit 7 as character1 into --ffid 1, 4 as character2 into id 2, ... "
        "(all held out of pretraining) and judges them strictly after every stage",
    )
    g.add_argument(
        "--characters",
        nargs="+",
        default=None,
        metavar="DIGIT",
        help="N distinct digits stacked into ids 1..N (instead of --character1/--character2)",
    )
    g.add_argument(
        "--stacking",
        choices=STACKINGS,
        default=None,
        help="sequential (default): each on top of the earlier deltas, preserving them (then again "
        "without preservation, the contrast); parallel: each from the base alone, then all merged",
    )
    g.add_argument(
        "--no_plain",
        action="store_true",
        help="sequential stacking: skip the unpreserved contrast (half the training time)",
    )
    g.add_argument(
        "--held_out",
        nargs="+",
        default=None,
        metavar="DIGIT",
        help="digits kept out of pretraining (default: the characters); every character must be one",
    )
    g.add_argument(
        "--character_samples",
        type=int,
        default=None,
        help="samples per character prompt and stage (default 128: about +-5 points at 90%%)",
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`ffid.demo.DemoConfig` from parsed flags (unset flags keep the demo's defaults)."""
    from ..demo.config import DemoConfig, quick_config

    keys = (
        "output_dir",
        "cache_dir",
        "seed",
        "threads",
        "selector",
        "ff",
        "ffid1",
        "ffid2",
        "steps",
        "learning_rate",
        "batch_size",
        "prior_per_class",
        "character2_mode",
        "preserve_weight",
        "preserve_items",
        "preserve_method",
        "projection_ff",
        "projection_lr",
        "preserve_energy",
        "pretrain_steps",
        "pretrain_lr",
        "character1",
        "character2",
        "samples",
        "sample_steps",
        "guidance",
    )
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    given |= _stack_flags(args)
    given["fresh"] = bool(args.fresh)
    given["progress"] = not args.no_progress
    cfg = quick_config(**given) if args.quick else DemoConfig(**given)
    return cfg.validate()


def _digits(flag: str, values: list[str]) -> tuple[int, ...]:
    """``--characters 7 4 1`` as ints; a value that is not one digit is named with the fix."""
    from ..errors import ConfigError

    for v in values:
        if not (len(v) == 1 and v.isdigit()):
            raise ConfigError(f"--{flag} {v!r} is not a digit 0..9; give digits such as --{flag} 7 4 1")
    return tuple(int(v) for v in values)


def _stack_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The stacking flags as DemoConfig fields; flags of the other mode are refused by name."""
    from ..errors import ConfigError

    if args.characters is None:
        extra = [f for f in STACK_FLAGS if getattr(args, f, None) is not None] + (
            ["no_plain"] if args.no_plain else []
        )
        if extra:
            raise ConfigError(
                f"--{extra[0]} is for stacked characters; add --characters, e.g. --characters 7 4 1"
            )
        return {}
    clash = [f for f in TWO_CHARACTER_FLAGS if getattr(args, f, None) is not None]
    if clash:
        raise ConfigError(
            f"--{clash[0]} is for the two-character demo; with --characters, character i is the i-th digit "
            "given and goes into id i"
        )
    given: dict[str, Any] = {
        "characters": _digits("characters", args.characters),
        "plain_contrast": not args.no_plain,
    }
    if args.held_out is not None:
        given["held_out_digits"] = _digits("held_out", args.held_out)
    for k in ("stacking", "character_samples"):
        if getattr(args, k) is not None:
            given[k] = getattr(args, k)
    return given


def run(args: argparse.Namespace) -> int:
    """Run the demo; the report is printed and written to ``{output_dir}/report.md``."""
    cfg = config_from_args(args)
    if cfg.characters:
        from ..demo.stacking import run_stack

        run_stack(cfg)
        return 0
    from ..demo.run import run_demo

    run_demo(cfg)
    return 0
