"""The knobs of ``ffid demo``: :class:`DemoConfig` (the CLI flags map one to one), its checks, the
character2 variants, and the shortened ``--quick`` config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ConfigError
from ..preserve import DEFAULT_WEIGHT, ProjectionSettings
from ..preserve import METHODS as PRESERVE_METHODS
from ..preserve.projection import DEFAULT_ENERGY
from ..select import DEFAULT_SELECTOR, ROW_SELECTOR, SelectionSettings
from .model import ModelSpec

DEMO_VERSION = 1  # bump when the base's recipe changes in a way the cache key cannot see
# character2's recipes; the last is the recommended one, merged into the full checkpoint
VARIANTS = ("plain", "rehearsed", "preserved")
CHARACTER2_MODES = ("all", *VARIANTS)
# how ``--characters`` are stacked: one after another on top of the earlier deltas (preserving
# them), or each from the base alone and then merged
STACKINGS = ("sequential", "parallel")
CHARACTER_SAMPLES = 128  # per character prompt and stage in a stacked run: +-5 points at 90%
# Projection's recipe: the blocks' Linears (the prototype's choice; the text embedder diverged
# there), whole rows, self-sampled protected inputs. Budget, rate and energy: docs/preservation.md.
PROJECTION_RECIPE: dict[str, Any] = {
    "include": r"^blocks\.",
    "ff": 0.05,
    "slots": 10,  # ids 0..9: up to 9 characters in ids 1..9, each at most a tenth of every matrix's rows
    "energy": DEFAULT_ENERGY,  # the rule's choice at ff 0.01 too (0.95 forgot, 0.999 learned less)
}
# The rate bench/stack_grid.py's rule chose for each budget measured at width 128 (rates 3e-3,
# 1e-2, 3e-2 at ff 0.01; bench/results/projection-grid-w128.md): fewer rows need a higher rate.
PROJECTION_RATES: dict[float, float] = {0.05: 3e-3, 0.01: 1e-2}


def projection_rate(ff: float) -> float:
    """Projection's rate for budget ``ff``: the rule's choice where it was measured, else the power
    law through the two measured budgets (rate ~ ff^-0.75; an interpolation, not a measurement),
    kept within the rates the grid tried."""
    if ff in PROJECTION_RATES:
        return PROJECTION_RATES[ff]
    (f1, r1), (f2, r2) = sorted(PROJECTION_RATES.items())
    slope = math.log(r2 / r1) / math.log(f2 / f1)
    rate = r1 * (ff / f1) ** slope
    return min(max(rate, 1e-3), 3e-2)


@dataclass
class DemoConfig:
    """Every knob of ``ffid demo`` (the CLI flags map one to one)."""

    output_dir: str = "ffid-demo"
    cache_dir: str | None = None  # where the base is cached; default {output_dir}/base
    fresh: bool = False
    seed: int = 0
    threads: int = 1
    # model and pretraining
    spec: ModelSpec = field(default_factory=ModelSpec)
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 64
    # the two characters (held out of pretraining)
    character1: int = 7
    character2: int = 4
    # ffid training
    selector: str = DEFAULT_SELECTOR
    ff: float = 0.01
    ffid1: int = 1
    ffid2: int = 2
    steps: int = 300
    learning_rate: float = 3e-2
    batch_size: int = 32
    prior_per_class: int = 23  # real scans of each base class mixed into a character's data (0: none)
    # how character2 is taught on top of character1: "plain" (its own data only), "rehearsed"
    # (character1's scans mixed in), "preserved" (no character1 data; preservation loss), or "all"
    # three from the same state, side by side
    character2_mode: str = "all"
    # preservation (the preserved variant): ffid train's preserve_* keys
    preserve_method: str = "loss"  # "loss" or "projection" (its own recipe: PROJECTION_RECIPE)
    preserve_weight: float = DEFAULT_WEIGHT
    preserve_items: int = 8
    # projection's recipe; None = PROJECTION_RECIPE's value, the rate projection_rate(ff)
    projection_ff: float | None = None
    projection_lr: float | None = None
    preserve_energy: float | None = None
    # N characters stacked (``--characters 7 4 1``): character i is digit characters[i-1] in id i;
    # empty: the two-character demo above (character1, character2, ffid1, ffid2)
    characters: tuple[int, ...] = ()
    stacking: str = "sequential"  # see STACKINGS
    plain_contrast: bool = True  # sequential: also the same characters without preservation
    # digits kept out of pretraining in a stacked run (default: the characters themselves)
    held_out_digits: tuple[int, ...] = ()
    # sampling and judging
    samples: int = 32  # per prompt, for the scores (per base class in a stacked run)
    character_samples: int = CHARACTER_SAMPLES  # per character prompt in a stacked run
    sample_steps: int = 20
    guidance: float = 3.0
    progress: bool = True

    def validate(self) -> DemoConfig:
        """Check every knob (a :class:`ConfigError` names the flag); returns ``self``, normalised."""
        if self.characters or self.held_out_digits:
            self._validate_characters()
        first = SelectionSettings.create(self.ff, self.ffid1, self.selector)
        second = first.replace(ffid=self.ffid2)
        self.ff, self.ffid1, self.ffid2 = first.ff, first.ffid, second.ffid
        if self.ffid1 == self.ffid2:
            raise ConfigError(
                f"--ffid1 and --ffid2 are both {self.ffid1}; the demo needs two different ids so the "
                "characters never share a weight, e.g. 1 and 2"
            )
        if self.character2_mode not in CHARACTER2_MODES:
            raise ConfigError(
                f"--character2_mode {self.character2_mode!r} is not one of {', '.join(CHARACTER2_MODES)}"
            )
        for name in ("character1", "character2"):
            if not 0 <= getattr(self, name) <= 9:
                raise ConfigError(f"--{name} {getattr(self, name)} is not a digit 0..9")
        if self.character1 == self.character2:
            raise ConfigError(
                f"--character1 and --character2 are both digit {self.character1}; pick two different digits"
            )
        for name in (
            "pretrain_steps",
            "steps",
            "samples",
            "sample_steps",
            "threads",
            "batch_size",
            "pretrain_batch",
            "character_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} must be at least 1")
        if not (math.isfinite(self.preserve_weight) and self.preserve_weight > 0):
            raise ConfigError(f"--preserve_weight {self.preserve_weight} must be a positive number")
        if self.preserve_method not in PRESERVE_METHODS:
            raise ConfigError(
                f"--preserve_method {self.preserve_method!r} is not one of {', '.join(PRESERVE_METHODS)}"
            )
        recipe = self.preserved_recipe()
        ProjectionSettings(energy=recipe.get("preserve_energy", DEFAULT_ENERGY)).validate()
        SelectionSettings.create(
            recipe["ff"],
            self.ffid2,
            recipe["selector"],
            include=recipe.get("include"),
            **recipe.get("selector_args", {}),
        )
        if self.preserve_items < 1:
            raise ConfigError(f"--preserve_items {self.preserve_items} must be at least 1")
        for name in ("pretrain_lr", "learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name} {value} must be a positive number")
        return self

    def preserved_recipe(self) -> dict[str, Any]:
        """``ffid train`` keys of a preserved run: the loss method keeps the demo's selection and
        rate; projection trains whole rows of the blocks' Linears at its own budget and rate."""
        return self.run_recipe(preserve=True)

    def run_recipe(self, preserve: bool) -> dict[str, Any]:
        """``ffid train`` keys of a character run. With ``preserve_method = 'projection'`` every
        run (preserved or not, character1 too) trains projection's rows, so that the runs' ids
        stay disjoint in one layout and their deltas merge; only preserved runs project."""
        if self.preserve_method != "projection":
            return {"ff": self.ff, "selector": self.selector, "learning_rate": self.learning_rate}
        r = PROJECTION_RECIPE
        ff = self.projection_ff if self.projection_ff is not None else r["ff"]
        recipe: dict[str, Any] = {
            "ff": ff,
            "selector": ROW_SELECTOR,
            "selector_args": {"slots": r["slots"]},
            "include": [r["include"]],
            "learning_rate": self.projection_lr if self.projection_lr is not None else projection_rate(ff),
        }
        if preserve:
            recipe["preserve_method"] = "projection"
            energy = self.preserve_energy
            recipe["preserve_energy"] = energy if energy is not None else r["energy"]
        return recipe

    @property
    def character2_variants(self) -> list[str]:
        """The character2 runs this config trains, the merged (recommended) one last."""
        return list(VARIANTS) if self.character2_mode == "all" else [self.character2_mode]

    @property
    def held_out(self) -> tuple[int, ...]:
        """The digits kept out of pretraining: the two characters, or in a stacked run
        ``held_out_digits`` (default: the stacked characters)."""
        if self.characters:
            return tuple(self.held_out_digits or self.characters)
        return (self.character1, self.character2)

    def _validate_characters(self) -> None:
        """``--characters`` and ``--held_out``: distinct digits, held out of pretraining, ids 1..N
        in the selection layout (its capacity is checked against the model by
        :func:`ffid.demo.stacking.check_ids`), one line naming the value and the fix."""
        if not self.characters:
            raise ConfigError("--held_out needs --characters: the two-character demo holds out its two")
        if self.stacking not in STACKINGS:
            raise ConfigError(f"--stacking {self.stacking!r} is not one of {', '.join(STACKINGS)}")
        for flag, digits in (("--characters", self.characters), ("--held_out", self.held_out_digits)):
            for d in digits:
                if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
                    raise ConfigError(f"{flag} {d!r} is not a digit 0..9; give digits such as {flag} 7 4 1")
            twice = next((d for d in digits if digits.count(d) > 1), None)
            if twice is not None:
                raise ConfigError(
                    f"{flag} gives digit {twice} twice; each character needs its own digit, e.g. {flag} 7 4 1"
                )
        held = self.held_out
        for d in self.characters:
            if d not in held:
                raise ConfigError(
                    f"--characters {d}: digit {d} is a base class (the base is pretrained on it; "
                    f"--held_out keeps out only {' '.join(map(str, held))}); add {d} to --held_out or "
                    "pick characters among the held-out digits"
                )
        if len(held) > 8:
            raise ConfigError(
                f"--held_out / --characters keep {len(held)} digits out of pretraining; give at most 8, so "
                "the base learns at least two classes"
            )
        n = len(self.characters)
        recipe = self.run_recipe(preserve=False)
        try:
            SelectionSettings.create(
                recipe["ff"],
                n,
                recipe["selector"],
                include=recipe.get("include"),
                **recipe.get("selector_args", {}),
            )
        except ConfigError as exc:
            raise ConfigError(
                f"--characters gives {n} characters (ids 1..{n}), more than the selection layout holds "
                f"({exc}); give fewer characters"
            ) from None

    def base_recipe(self) -> dict[str, Any]:
        """What the pretrained base depends on; its hash is the cache key."""
        return {
            "version": DEMO_VERSION,
            "spec": self.spec.to_dict(),
            "steps": self.pretrain_steps,
            "lr": self.pretrain_lr,
            "batch": self.pretrain_batch,
            "seed": self.seed,
            "held_out": sorted(self.held_out),
            "threads": self.threads,
        }


QUICK = {
    "spec": ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16),
    "pretrain_steps": 40,
    "steps": 12,
    "samples": 6,
    "character_samples": 6,
    "sample_steps": 6,
}


def quick_config(**overrides: Any) -> DemoConfig:
    """A shortened demo (small model, few steps) for tests and a first look."""
    values: dict[str, Any] = {**QUICK, **overrides}
    return DemoConfig(**values)


def spec_of_width(width: int) -> ModelSpec:
    """The demo model at another width: heads of 16 channels and an FFN twice the width, as the
    64-wide model has (``ffid demo --width``, ``bench/stack.py --width``, ``ship_base --width``)."""
    return replace(ModelSpec(), dim=width, heads=width // 16, ffn_dim=2 * width)


# ``ffid demo``'s default: the seed's workflow, three characters stacked by projection in the
# 128-wide model, where projection's budget learns every character and keeps every earlier one
# (docs/preservation.md); its base, with 9 held out as well (room for a fourth character), ships
# with ffid. The two-character demo (``--pair``) keeps DemoConfig's own defaults.
STACK_WIDTH = 128
STACK_CHARACTERS = (7, 4, 1)
STACK_HELD_OUT = (1, 4, 7, 9)
# Steps per character: on seed 0 150 steps learned each character to 99-100% confident, as 300 did,
# and half the training keeps the whole default run (with its contrast) within 8 minutes here.
STACK_STEPS = 150


def stacked_config(*, quick: bool = False, **overrides: Any) -> DemoConfig:
    """``ffid demo``'s default run: :data:`STACK_CHARACTERS` stacked in ids 1..3, preserved by
    projection, in the :data:`STACK_WIDTH`-wide model, with the plain contrast. ``overrides`` are
    DemoConfig fields; characters outside :data:`STACK_HELD_OUT` are held out by themselves
    (their base is then pretrained), and ``quick`` shortens it as :func:`quick_config` does."""
    values: dict[str, Any] = {
        "characters": STACK_CHARACTERS,
        "spec": spec_of_width(STACK_WIDTH),
        "preserve_method": "projection",
        "steps": STACK_STEPS,
        **(QUICK if quick else {}),
        **overrides,
    }
    if "held_out_digits" not in overrides:
        inside = set(values["characters"]) <= set(STACK_HELD_OUT)
        values["held_out_digits"] = STACK_HELD_OUT if inside else ()
    return DemoConfig(**values)
