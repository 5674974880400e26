#!/usr/bin/env python
"""Choose projection's rate and energy share by a rule, from saved ``bench/stack.py`` runs.

Every run given is one setting (budget ``ff``, rate, energy) of the projection method on one
seed and digit set. The rule, fixed before the runs were read:

1. **Score** a setting by the lower end of the 95% interval of its mean confident accuracy after
   all N characters: one number that falls when a character is learned badly *or* forgotten, and
   that rewards a setting only for what its noise cannot explain.
2. Among the settings of the same budget (and width) on the *development* runs (the first seed
   and digit set given), **choose the highest score**; a tie goes to the lower rate, then to the
   higher energy (the setting that changes the model less).
3. The other runs (other seeds, other digit sets) are **validation**: they are reported, never
   used to choose.

    python bench/stack_grid.py bench/results/stack-w128-seed0-ff001*.json
    python bench/stack_grid.py --out bench/results/projection-grid.md bench/results/stack-w128-*ff001*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from compare_report import md_table  # noqa: E402
from stack_report import summarize  # noqa: E402

from ffid.demo.stack_report import interval  # noqa: E402


@dataclass(frozen=True, eq=False)  # compared by identity: one per run
class Setting:
    """One projection run: where it ran and what it scored."""

    file: str
    width: int
    seed: int
    digits: tuple[int, ...]
    ff: float
    lr: float
    energy: float
    own: dict[str, Any]
    after: dict[str, Any]
    retention_low: float | None  # the lowest lower end over the earlier characters
    vs_lora_own: dict[str, Any] | None
    vs_lora_after: dict[str, Any] | None = None

    @property
    def score(self) -> float:
        return float(self.after["low"])

    @property
    def tie_key(self) -> tuple[float, float, float]:
        return (-self.score, self.lr, -self.energy)


def read_settings(paths: Sequence[str]) -> list[Setting]:
    """The projection runs of the given stack JSON files, one per seed."""
    out = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        for record in data["seeds"]:
            # summarised again from the stored hits, so that files saved by an older report have
            # every figure this one reads (learning against LoRA, when LoRA ran beside it)
            for run in record["methods"].values():
                run.pop("summary", None), run.pop("checks", None)
            summarize(record, list(record["methods"]))
            run = record["methods"].get("projection")
            if not run or "summary" not in run:
                continue
            recipe, s = run["recipe"], run["summary"]
            lows = [r["low"] for r in s["retention"].values() if r is not None and r["low"] is not None]
            out.append(
                Setting(
                    file=Path(p).name,
                    width=int(record["config"]["spec"]["dim"]),
                    seed=int(record["seed"]),
                    digits=tuple(record["config"]["characters"]),
                    ff=float(recipe["ff"]),
                    lr=float(recipe["learning_rate"]),
                    energy=float(recipe["preserve_energy"]),
                    own=s["mean_confident_own"],
                    after=s["mean_confident_after_all"],
                    retention_low=min(lows) if lows else None,
                    vs_lora_own=s.get("mean_confident_own_minus_lora"),
                    vs_lora_after=s.get("mean_confident_minus_lora"),
                )
            )
    return out


def choose(settings: list[Setting]) -> tuple[dict[tuple[int, float], Setting], list[Setting]]:
    """The rule (module docstring): per (width, budget), the best development setting; the rest
    of the runs are validation."""
    if not settings:
        raise SystemExit("no projection run in the files given")
    dev_seed, dev_digits = settings[0].seed, settings[0].digits
    dev = [s for s in settings if (s.seed, s.digits) == (dev_seed, dev_digits)]
    chosen: dict[tuple[int, float], Setting] = {}
    for s in sorted(dev, key=lambda s: s.tie_key):
        chosen.setdefault((s.width, s.ff), s)
    return chosen, [s for s in settings if s not in dev]


def render(settings: list[Setting], command: str) -> str:
    chosen, validation = choose(settings)
    picked = set(chosen.values())

    def row(s: Setting) -> list[str]:
        low = "-" if s.retention_low is None else f"{100 * s.retention_low:.0f}%"
        vs = "-" if s.vs_lora_own is None else f"{100 * s.vs_lora_own['value']:+.1f}"
        vs_after = "-" if s.vs_lora_after is None else f"{100 * s.vs_lora_after['value']:+.1f}"
        return [
            f"{s.width}",
            f"{s.seed}; {' '.join(map(str, s.digits))}",
            f"{s.ff:g}",
            f"{s.lr:g}",
            f"{s.energy:g}",
            interval(s.own),
            interval(s.after),
            f"{100 * s.score:.0f}" + (" **chosen**" if s in picked else ""),
            low,
            vs,
            vs_after,
            s.file,
        ]

    head = [
        "width",
        "seed; digits",
        "ff",
        "rate",
        "energy",
        "mean own",
        "mean after all",
        "score (low end after all)",
        "lowest retention low end",
        "own minus LoRA (points)",
        "after all minus LoRA (points)",
        "file",
    ]
    dev = [s for s in settings if s not in validation]
    lines = [
        "# Projection's rate and energy, chosen by a rule",
        "",
        f"`{command}`",
        "",
        "Rule (bench/stack_grid.py): score = lower end of the 95% interval of the mean confident "
        "accuracy after all characters; per width and budget, the highest score on the development "
        "runs (the first seed and digit set given) is chosen, ties to the lower rate, then the "
        "higher energy. Other seeds and digit sets validate the choice; they do not choose.",
        "",
        "## Development",
        "",
        md_table(head, [row(s) for s in sorted(dev, key=lambda s: (s.width, s.ff, s.lr, s.energy))]),
    ]
    if validation:
        lines += [
            "",
            "## Validation",
            "",
            md_table(head, [row(s) for s in sorted(validation, key=lambda s: (s.seed, s.digits))]),
        ]
    lines += [""] + [
        f"- chosen at width {w}, ff {ff:g}: rate {s.lr:g}, energy {s.energy:g} (score {100 * s.score:.0f})"
        for (w, ff), s in sorted(chosen.items())
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="bench/stack.py JSONs; the first names the development run")
    ap.add_argument("--out", help="also write the report here (.md)")
    args = ap.parse_args(argv)
    given = list(argv) if argv is not None else sys.argv[1:]
    text = render(read_settings(args.files), ("python bench/stack_grid.py " + " ".join(given)).strip())
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
