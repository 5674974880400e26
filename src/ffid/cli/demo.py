"""``ffid demo``: the seed's workflow (characters stacked in one model) on a tiny Wan and real
digits, in one command; ``--pair`` runs the two-character demo."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError

STACKINGS = ("sequential", "parallel")  # ffid.demo.config.STACKINGS (not imported: a light CLI)
# flags of the two-character demo that mean nothing with --characters, and the reverse
TWO_CHARACTER_FLAGS = ("character1", "character2", "ffid1", "ffid2", "character2_mode")
STACK_FLAGS = ("stacking", "held_out", "character_samples")
# the loss method's recipe (the two-character demo's); the stacked demo trains projection's own
LOSS_RECIPE_FLAGS = ("ff", "selector", "learning_rate")

DEFAULTS_NOTE = (
    "defaults: three characters stacked by projection on the base shipped with ffid (about 7.5 minutes "
    "on one thread here; --fresh, another seed or another base setting pretrains its base first, about 8 "
    "minutes more at width 128); --quick: a short smoke run"
)


def register(subparsers: Any) -> None:
    """Add the ``demo`` command."""
    p = subparsers.add_parser(
        "demo",
        help="pretrain a tiny Wan on real digits, stack three characters into --ffid 1, 2, 3, merge, report",
        description=(
            "Teach a small Wan-architecture DiT (diffusers WanTransformer3DModel, pretrained on "
            "scikit-learn's handwritten digits except the held-out ones) three characters one after "
            "another, digits 7, 4 and 1 as 'character1..3' in ids 1, 2, 3, each on top of the earlier "
            "deltas through the ffid trainer with protection by projection (then again without it, the "
            "contrast), merge the deltas into a full checkpoint, and judge samples of every prompt at "
            "every stage with a calibrated classifier trained on the real digits. --characters picks "
            "other digits (any N), --stacking parallel trains each from the base and merges them; "
            "--pair runs the two-character demo (character2 three ways: plain, rehearsed, preserved by "
            "the loss). CPU only, no network. " + DEFAULTS_NOTE
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
    p.add_argument(
        "--width",
        type=int,
        choices=(64, 128, 256),
        default=None,
        help="the demo model's width (default 128 stacked, 64 with --pair); a width without a shipped "
        "base pretrains one",
    )
    p.add_argument(
        "--pair",
        action="store_true",
        help="the two-character demo: character1, then character2 three ways (plain, rehearsed, preserved "
        "by the loss) in the 64-wide model; its own flags below (--character1 ... --character2_mode) "
        "imply it",
    )
    p.add_argument(
        "--selector",
        default=None,
        help="--pair / loss method: selection algorithm, spread (default) or compat-v2",
    )
    p.add_argument(
        "--ff",
        type=float,
        default=None,
        help="--pair / loss method: fraction of the model each character trains (default 0.01)",
    )
    p.add_argument("--ffid1", type=int, default=None, help="selection id of character1 (default 1)")
    p.add_argument("--ffid2", type=int, default=None, help="selection id of character2 (default 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per character")
    p.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="--pair / loss method: learning rate of the character runs",
    )
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
        help="how the preserved runs keep earlier characters: projection (the stacked demo's default: "
        "every trained row's change kept off the inputs its layers see for the protected prompts; its "
        "own recipe: whole rows of the blocks' Linears, --projection_ff, --projection_lr) or loss (the "
        "default of --pair)",
    )
    p.add_argument("--projection_ff", type=float, default=None, help="projection's budget (default 0.05)")
    p.add_argument(
        "--projection_lr",
        type=float,
        default=None,
        help="projection's learning rate (default: the rate chosen for the budget, 3e-3 at ff 0.05 and "
        "1e-2 at ff 0.01)",
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
        help="N distinct digits stacked into ids 1..N (default 7 4 1)",
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
        help="digits kept out of pretraining (default 1 4 7 9, the shipped base's, when the characters are "
        "among them, else the characters); every character must be one",
    )
    g.add_argument(
        "--character_samples",
        type=int,
        default=None,
        help="samples per character prompt and stage (default 128: about +-5 points at 90%%)",
    )
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`ffid.demo.DemoConfig` from parsed flags (unset flags keep the demo's defaults):
    the stacked demo (:func:`ffid.demo.config.stacked_config`) unless ``--pair`` or a flag of the
    two-character demo asks for that one."""
    from ..demo.config import DemoConfig, quick_config, spec_of_width, stacked_config

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
    given["fresh"] = bool(args.fresh)
    given["progress"] = not args.no_progress
    if args.width is not None:
        given["spec"] = spec_of_width(args.width)
    if is_pair(args):
        given |= _pair_flags(args)
        cfg = quick_config(**given) if args.quick else DemoConfig(**given)
        return cfg.validate()
    given |= _stack_flags(args)
    if given.get("preserve_method", "projection") == "projection":
        loss_only = [k for k in LOSS_RECIPE_FLAGS if k in given]
        if loss_only:
            raise ConfigError(
                f"--{loss_only[0]} sets the loss method's recipe, but the stacked demo trains by "
                "projection (its own budget and rate): give --projection_ff / --projection_lr, or add "
                "--preserve_method loss"
            )
    if args.quick and args.width is None:
        given.pop("spec", None)  # the quick model
    return stacked_config(quick=args.quick, **given).validate()


def is_pair(args: argparse.Namespace) -> bool:
    """Whether the flags ask for the two-character demo (``--pair`` or one of its own flags)."""
    return bool(getattr(args, "pair", False)) or any(
        getattr(args, f, None) is not None for f in TWO_CHARACTER_FLAGS
    )


def _pair_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The two-character demo takes no stacking flag: one is refused by name, with the fix."""
    extra = [f for f in ("characters", *STACK_FLAGS) if getattr(args, f, None) is not None] + (
        ["no_plain"] if args.no_plain else []
    )
    if extra:
        pair = next((f for f in TWO_CHARACTER_FLAGS if getattr(args, f, None) is not None), None)
        why = f"--{pair}" if pair else "--pair"
        raise ConfigError(
            f"--{extra[0]} is for stacked characters, but {why} asks for the two-character demo; drop "
            f"{why} (the default demo stacks --characters 7 4 1)"
        )
    return {}


def _digits(flag: str, values: list[str]) -> tuple[int, ...]:
    """``--characters 7 4 1`` as ints; a value that is not one digit is named with the fix."""
    for v in values:
        if not (len(v) == 1 and v.isdigit()):
            raise ConfigError(f"--{flag} {v!r} is not a digit 0..9; give digits such as --{flag} 7 4 1")
    return tuple(int(v) for v in values)


def _stack_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The stacking flags as DemoConfig fields (``--characters`` default: 7 4 1)."""
    given: dict[str, Any] = {"plain_contrast": not args.no_plain}
    if args.characters is not None:
        given["characters"] = _digits("characters", args.characters)
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
