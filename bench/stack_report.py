"""The stacking benchmark's numbers and report (bench/stack.py runs, this module reads).

Everything here is computed from the run's JSON record alone (per-sample hits are stored), so a
saved run can be summarised and rendered again without the models.

Targets of issue 20, checked per method (LoRA sequential is the reference, not checked):

- every earlier character keeps >= 90% of its confident-accuracy gain after all N, and the
  interval's lower end is >= 80%;
- the base classes (confident, pooled) after all N are at most 2 points below after character1;
- the characters' mean confident accuracy after all N is >= LoRA sequential's + 20 points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from compare_report import md_table

from ffid.demo.judge import Estimate, bootstrap_mean, difference, hits_of, retention
from ffid.demo.stack_report import interval, pct
from ffid.demo.stack_report import points as _points
from ffid.demo.stack_report import pool as _pool

KEEP = 0.90  # an earlier character keeps >= 90% of its gain
KEEP_LOW = 0.80  # ... with the interval's lower end >= 80%
BASE_POINTS = 0.02  # base classes after all N at most 2 points below after character1
OVER_LORA = 0.20  # mean confident after all N >= LoRA sequential + 20 points
MEASURES = ("confident", "argmax")


def _est(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else e.to_dict()


def summarize(record: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Add ``summary`` and ``checks`` to every finished method of one seed's record (in place)."""
    seed, resamples = record["seed"], record["resamples"]
    chars = [f"character{i}" for i in range(1, len(record["config"]["characters"]) + 1)]
    bases = [n for n in record["before"] if not n.startswith("character")]
    before = record["before"]
    for m in methods:
        run = record["methods"].get(m)
        if run is None or "stages" not in run:
            continue
        stages = {s["name"]: s["scores"] for s in run["stages"]}
        final = run["stages"][-1]
        own = {c: stages[c][c] for c in chars}
        after = {c: final["scores"][c] for c in chars}
        summary: dict[str, Any] = {"final_stage": final["name"]}
        for measure in MEASURES:
            summary[f"mean_{measure}_own"] = _est(_pool(own, chars, measure, seed, resamples))
            summary[f"mean_{measure}_after_all"] = _est(
                bootstrap_mean(np.concatenate([hits_of(after[c], measure) for c in chars]), resamples, seed)
            )
            for key, scores in (
                ("before", before),
                ("after_character1", stages["character1"]),
                ("after_all", final["scores"]),
            ):
                summary[f"base_{measure}_{key}"] = _est(_pool(scores, bases, measure, seed, resamples))
        # retention of every character whose own stage is not the last one (all but the last in a
        # sequential run; every one after a parallel run's merge)
        summary["retention"] = {
            c: _est(retention(hits_of(before[c]), hits_of(own[c]), hits_of(after[c]), resamples, seed))
            for c in chars
            if final["name"] != c
        }
        base_change = difference(
            np.concatenate([hits_of(final["scores"][n]) for n in bases]),
            np.concatenate([hits_of(stages["character1"][n]) for n in bases]),
            resamples,
            seed,
        )
        summary["base_confident_change"] = _est(base_change)
        run["summary"] = summary
    lora = record["methods"].get("lora", {})
    for m in methods:
        run = record["methods"].get(m)
        if run is None or "summary" not in run or m == "lora":
            continue
        vs = None
        if "stages" in lora:
            vs = difference(*(_final_hits(r, chars) for r in (run, lora)), resamples=resamples, seed=seed)
            run["summary"]["mean_confident_minus_lora"] = _est(vs)
            # learning at the same judge: each character right after its own run, against LoRA's
            own_vs = difference(*(_own_hits(r, chars) for r in (run, lora)), resamples=resamples, seed=seed)
            run["summary"]["mean_confident_own_minus_lora"] = _est(own_vs)
        run["checks"] = checks(run["summary"], vs, before, own_of(run, chars))
    return record


def _final_hits(run: dict[str, Any], chars: Sequence[str]) -> np.ndarray:
    final = run["stages"][-1]["scores"]
    return np.concatenate([hits_of(final[c]) for c in chars])


def _own_hits(run: dict[str, Any], chars: Sequence[str]) -> np.ndarray:
    return np.concatenate([hits_of(s) for s in own_of(run, chars).values()])


def own_of(run: dict[str, Any], chars: Sequence[str]) -> dict[str, dict[str, Any]]:
    stages = {s["name"]: s["scores"] for s in run["stages"]}
    return {c: stages[c][c] for c in chars}


def checks(
    summary: dict[str, Any],
    vs_lora: Estimate | None,
    before: dict[str, Any],
    own: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """PASS/MISS of the targets (module docstring) for one method of one seed."""
    out = []
    for c, r in summary["retention"].items():
        ok = r is not None and r["value"] >= KEEP and r["low"] is not None and r["low"] >= KEEP_LOW
        kept = interval(r) if r else "undefined: no confident gain"
        detail = (
            f"retention {kept} (confident {pct(before[c]['confident']['value'])} before → "
            f"{pct(own[c]['confident']['value'])} after its own run)"
        )
        out.append(
            {
                "target": f"{c} keeps >= {KEEP:.0%} of its gain, low end >= {KEEP_LOW:.0%}",
                "ok": ok,
                "detail": detail,
            }
        )
    change = summary["base_confident_change"]
    out.append(
        {
            "target": f"base classes after all within {BASE_POINTS * 100:.0f} points of after character1",
            "ok": change["value"] >= -BASE_POINTS - 1e-9,
            "detail": f"{pct(summary['base_confident_after_character1']['value'], 1)} → "
            f"{pct(summary['base_confident_after_all']['value'], 1)} ({_points(change)})",
        }
    )
    if vs_lora is not None:
        out.append(
            {
                "target": f"mean confident after all >= LoRA sequential + {OVER_LORA * 100:.0f} points",
                "ok": vs_lora.value >= OVER_LORA - 1e-9,
                "detail": f"{pct(summary['mean_confident_after_all']['value'])}, "
                f"{_points(vs_lora.to_dict())} vs LoRA",
            }
        )
    return out


def _cell(score: dict[str, Any] | None) -> str:
    if score is None:
        return "-"
    return f"{interval(score['confident'])} · {pct(score['argmax']['value'])}"


def matrix(record: dict[str, Any], method: str) -> str:
    """Every character's (and the base classes') score after each stage of ``method``."""
    run = record["methods"][method]
    chars = [f"character{i}" for i in range(1, len(record["config"]["characters"]) + 1)]
    bases = [n for n in record["before"] if not n.startswith("character")]
    seed, resamples = record["seed"], record["resamples"]
    columns = [("before", record["before"])] + [
        (f"after {s.get('label', s['name'])}", s["scores"]) for s in run["stages"]
    ]
    rows = []
    for i, c in enumerate(chars):
        digit = record["config"]["characters"][i]
        rows.append([f"{c} (digit {digit})", *(_cell(scores.get(c)) for _, scores in columns)])
    base_cells = []
    for _, scores in columns:
        pooled = {m: _pool(scores, bases, m, seed, resamples).to_dict() for m in MEASURES}
        base_cells.append(_cell(pooled))
    rows.append([f"base classes ({len(bases)}, pooled)", *base_cells])
    return md_table(["prompt", *(name for name, _ in columns)], rows)


def train_seconds_per_step(record: dict[str, Any], run: dict[str, Any]) -> float | None:
    """Training wall seconds per step of one method, over its character stages (a projected
    run's feature passes included: they are part of its cost); ``None`` before any stage."""
    stages = [s for s in run.get("stages", []) if s["name"].startswith("character")]
    if not stages:
        return None
    return sum(s["train_s"] for s in stages) / (len(stages) * record["config"]["steps"])


def _per_step(record: dict[str, Any], m: str) -> str:
    """Seconds per step, and the ratio to LoRA's measured in the same process where it ran."""
    mine = train_seconds_per_step(record, record["methods"][m])
    lora = train_seconds_per_step(record, record["methods"].get("lora", {}))
    if mine is None:
        return "-"
    ratio = f" ({mine / lora:.2f}x LoRA)" if lora and m != "lora" else ""
    return f"{mine:.3f}{ratio}"


def seed_table(record: dict[str, Any], titles: dict[str, str]) -> str:
    rows = []
    for m, title in titles.items():
        run = record["methods"].get(m)
        if run is None:
            continue
        if "summary" not in run:
            rows.append([title, run.get("skipped", "not run"), "", "", "", "", ""])
            continue
        s = run["summary"]
        rows.append(
            [
                title,
                interval(s["mean_confident_own"]),
                interval(s["mean_confident_after_all"]),
                ", ".join(f"{c[9:]}: {interval(r)}" for c, r in s["retention"].items()) or "-",
                " / ".join(
                    pct(s[f"base_confident_{k}"]["value"], 1)
                    for k in ("before", "after_character1", "after_all")
                ),
                _per_step(record, m),
                f"{run['seconds']:.0f}",
            ]
        )
    return md_table(
        [
            "method",
            "mean confident, after own runs",
            "mean confident, after all",
            "retention (confident) by character",
            "base classes before / after char1 / after all",
            "train s per step",
            "seconds",
        ],
        rows,
    )


def render(payload: dict[str, Any], elapsed: float) -> str:
    """The markdown report of a (possibly partial) run."""
    titles = payload["methods"]
    seeds = payload["seeds"]
    first = seeds[0]
    cfg = first["config"]
    chars = cfg["characters"]
    lines = [
        "# Stacking benchmark",
        "",
        f"Command: `{payload['command']}` ({elapsed:.0f} s wall so far, machine shared).",
        "",
        f"{len(chars)} characters taught one after another: "
        + ", ".join(f"character{i} = digit {d}" for i, d in enumerate(chars, 1))
        + f"; base classes {', '.join(n for n in first['before'] if not n.startswith('character'))}. "
        f"The `ffid demo` model ({cfg['spec']['dim']} dim, {cfg['spec']['layers']} blocks), pretrained "
        f"{cfg['pretrain_steps']} steps on the base classes (one base per seed, cached by recipe). Every "
        f"method: {cfg['steps']} steps per character, batch {cfg['batch_size']}, {cfg['prior_per_class']} "
        f"prior scans per base class. ffid: ff {cfg['ff']}, lr {cfg['learning_rate']:g}, selector "
        f"`{cfg['selector']}`, character i in id i ({first['ffid_trainable']:,} weights each). LoRA: rank "
        f"{first['lora_rank']} (matched to that count), lr {payload['args']['lora_lr']:g}, merged after each "
        f"character. Full FT: lr {payload['args']['full_lr']:g}.",
        "",
        f"Judge: the demo's SVM on real scans only ({pct(first['judge']['holdout_argmax'], 1)} argmax, "
        f"{pct(first['judge']['holdout_confident'], 1)} confident on held-out real scans). {cfg['samples']} "
        f"samples per prompt and stage, {cfg['sample_steps']} Euler steps, guidance {cfg['guidance']}. "
        f"Cells: *confident* accuracy (calibrated p(intended digit) >= {first['judge']['confident_at']}) "
        "with its bootstrap 95% interval · argmax accuracy. Retention = (after all − before) / "
        f"(after own run − before) on confident accuracy; intervals from {payload['args']['resamples']} "
        "resamples, each stage resampled independently. '-': not sampled (not taught yet).",
    ]
    for record in seeds:
        lines += ["", f"## Seed {record['seed']}"]
        for m, title in titles.items():
            run = record["methods"].get(m)
            if run is None:
                continue
            lines += ["", f"### {title}", ""]
            if "stages" not in run:
                lines.append(run.get("skipped", "not run"))
                continue
            if run.get("recipe"):
                shown = ", ".join(f"{k} {v}" for k, v in run["recipe"].items())
                lines += [f"Recipe: {shown}.", ""]
            lines.append(matrix(record, m))
            if run.get("checks"):
                lines.append("")
                lines += [
                    f"- {'PASS' if c['ok'] else 'MISS'}: {c['target']}: {c['detail']}" for c in run["checks"]
                ]
        lines += ["", f"### Seed {record['seed']}: summary", "", seed_table(record, titles)]
        lines += _vs_lora_lines(record, titles)
    if len(seeds) > 1:
        lines += ["", "## Over seeds", "", over_seeds(seeds, titles)]
    return "\n".join(lines) + "\n"


def _vs_lora_lines(record: dict[str, Any], titles: dict[str, str]) -> list[str]:
    """Each method minus LoRA sequential on the mean confident accuracy, after own runs (learning)
    and after all N (what is left), with the bootstrap interval of each difference."""
    out = []
    for m, title in titles.items():
        s = record["methods"].get(m, {}).get("summary", {})
        own, after = s.get("mean_confident_own_minus_lora"), s.get("mean_confident_minus_lora")
        if own is None or after is None:
            continue
        out.append(
            f"- {title} minus LoRA sequential: after own runs {_points(own)}, after all {_points(after)}"
        )
    return ["", *out] if out else []


def over_seeds(seeds: list[dict[str, Any]], titles: dict[str, str]) -> str:
    rows = []
    for m, title in titles.items():
        runs = [r["methods"].get(m, {}) for r in seeds]
        if not any("summary" in x for x in runs):
            continue
        s = [x.get("summary") for x in runs]
        rows.append(
            [
                title,
                " / ".join(pct(x["mean_confident_after_all"]["value"]) if x else "-" for x in s),
                " / ".join(_worst(x) for x in s),
                " / ".join(f"{x['base_confident_change']['value'] * 100:+.1f}" if x else "-" for x in s),
                " / ".join(
                    f"{sum(c['ok'] for c in x.get('checks', []))}/{len(x.get('checks', []))}"
                    if x.get("checks")
                    else "-"
                    for x in runs
                ),
            ]
        )
    names = " / ".join(str(r["seed"]) for r in seeds)
    return md_table(
        [
            "method",
            f"mean confident after all (seeds {names})",
            "lowest retention",
            "base after all − after char1 (points)",
            "targets met",
        ],
        rows,
    )


def _worst(summary: dict[str, Any] | None) -> str:
    if not summary or not summary["retention"]:
        return "-"
    values = [r["value"] for r in summary["retention"].values() if r is not None]
    return pct(min(values)) if values else "-"
