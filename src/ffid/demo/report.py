"""The demo's report: the numbers as JSON-ready values (``report.json``), then the terminal table
and ``report.md``, which read that dict only (so a saved ``report.json`` renders the same way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..preserve import DEFAULT_WEIGHT
from .classifier import DigitJudge
from .config import DemoConfig
from .data import DIGIT_WORDS
from .evaluate import StageScores
from .shipped import base_origin, is_shipped
from .task import base_concepts


def build_report(
    cfg: DemoConfig,
    stages: list[StageScores],
    info1: dict[str, Any],
    infos2: dict[str, dict[str, Any]],
    judge: DigitJudge,
    total: int,
    merged_same: bool,
    cached: bool,
    timings: dict[str, float],
    base_path: Path,
    merged_path: Path,
) -> dict[str, Any]:
    """The numbers the demo is about, as plain JSON-ready values.

    The summary's unsuffixed 3b keys describe the character2 variant that was merged (the
    recommended one when both ran); ``*_plain`` / ``*_rehearsed`` keys give each variant trained.
    """
    by = {s.name: s.accuracy for s in stages}
    variants = cfg.character2_variants
    merged_variant = variants[-1]
    base_names = [c.name for c in base_concepts(cfg.held_out)]

    def mean(stage: str) -> float:
        return sum(by[stage][n] for n in base_names) / len(base_names)

    after = f"character2_{merged_variant}"
    summary: dict[str, Any] = {
        "character1_before": by["base"]["character1"],
        "character1_after_3a": by["character1"]["character1"],
        "character1_after_3b": by[after]["character1"],
        "character2_before": by["base"]["character2"],
        "character2_after_3b": by[after]["character2"],
        "base_classes_before": mean("base"),
        "base_classes_after_3a": mean("character1"),
        "base_classes_after_3b": mean(after),
        "merged_equals_deltas": merged_same,
    }
    for v in variants:
        summary[f"character1_after_3b_{v}"] = by[f"character2_{v}"]["character1"]
        summary[f"character2_after_3b_{v}"] = by[f"character2_{v}"]["character2"]
        summary[f"base_classes_after_3b_{v}"] = mean(f"character2_{v}")
    return {
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "spec"}, "spec": cfg.spec.to_dict()},
        "model_params": total,
        "judge_holdout_accuracy": judge.holdout_accuracy,
        "summary": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
        "stages": {s.name: {k: round(v, 4) for k, v in s.accuracy.items()} for s in stages},
        "predictions": {s.name: s.predictions for s in stages},
        "character2_variants": variants,
        "character2_merged": merged_variant,
        "characters": {
            "character1": info1,
            "character2": infos2[merged_variant],
            **{f"character2_{v}": infos2[v] for v in variants},
        },
        "files": {
            "base": str(base_path),
            "base_cached": cached,
            "base_shipped": is_shipped(base_path),
            "delta1": info1["delta"],
            "delta2": infos2[merged_variant]["delta"],
            **{f"delta2_{v}": infos2[v]["delta"] for v in variants},
            "merged": str(merged_path),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": cfg.threads,
    }


def strict_report(
    stages: dict[str, dict[str, Any]], seed: int, judge: DigitJudge, variants: list[str]
) -> dict[str, Any]:
    """The strict judge's part of ``report.json``: every stage's verdicts (argmax and confident
    accuracy with bootstrap 95% intervals, per-sample hits), the base classes pooled, character1's
    retention of its confident gain after each 3b variant, and the differences the report names,
    each with its interval and whether it exceeds its noise (:mod:`.stack_report`)."""
    import numpy as np

    from .judge import RESAMPLES, difference, hits_of, retention
    from .stack_report import MEASURES, beyond_noise, pool

    bases = [n for n in stages["base"] if not n.startswith("character")]
    out: dict[str, Any] = {
        "judge": {
            "holdout_argmax": judge.holdout_accuracy,
            "holdout_confident": judge.holdout_confident,
            "confident_at": judge.confident_at,
            "resamples": RESAMPLES,
        },
        "stages": stages,
        "base_pooled": {
            st: {m: pool(sc, bases, m, seed).to_dict() for m in MEASURES} for st, sc in stages.items()
        },
    }
    c1 = [hits_of(stages[st]["character1"]) for st in ("base", "character1")]
    kept = {v: retention(*c1, hits_of(stages[f"character2_{v}"]["character1"]), seed=seed) for v in variants}
    out["retention_character1"] = {v: (None if r is None else r.to_dict()) for v, r in kept.items()}
    diffs = []

    def add(what: str, a: Any, b: Any) -> None:
        d = difference(a, b, seed=seed).to_dict()
        diffs.append({"what": what, "difference": d, "beyond_noise": beyond_noise(d)})

    def base_hits(stage: str) -> Any:
        return np.concatenate([hits_of(stages[stage][n]) for n in bases])

    for v in variants:
        after = stages[f"character2_{v}"]
        add(f"character1 after 3b {v} minus after 3a", hits_of(after["character1"]), c1[1])
        add(f"base classes after 3b {v} minus before", base_hits(f"character2_{v}"), base_hits("base"))
    for other in ("plain", "rehearsed"):
        if other in variants and "preserved" in variants:
            for c in ("character1", "character2"):
                add(
                    f"{c} after 3b: preserved minus {other}",
                    hits_of(stages["character2_preserved"][c]),
                    hits_of(stages[f"character2_{other}"][c]),
                )
    out["differences"] = diffs
    return out


def render_strict(report: dict[str, Any]) -> list[str]:
    """``report.md``'s strict-judge section (from ``report["strict"]`` alone)."""
    from .stack_report import interval, points

    strict = report.get("strict")
    if not strict:
        return []
    j = strict["judge"]
    stages = list(strict["stages"])
    n = report["config"]["samples"]

    def cell(score: dict[str, Any]) -> str:
        return f"{interval(score['confident'])} · {interval(score['argmax'])}"

    lines = [
        "## Strict judge",
        "",
        f"The same samples, judged strictly: **confident** accuracy (calibrated p(intended digit) >= "
        f"{j['confident_at']}; {j['holdout_confident']:.1%} of held-out real scans reach it) · argmax "
        f"accuracy, each with its bootstrap 95% interval ({j['resamples']} resamples of {n} samples per "
        "prompt: one sample moves a score by "
        f"{100 / n:.0f} points). Retention is on confident accuracy.",
        "",
        "| prompt | " + " | ".join(STAGE_TITLES.get(st, st) for st in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name in strict["stages"][stages[0]]:
        lines.append(
            f"| a digit {name} | " + " | ".join(cell(strict["stages"][st][name]) for st in stages) + " |"
        )
    lines.append(
        "| **base classes (pooled)** | " + " | ".join(cell(strict["base_pooled"][st]) for st in stages) + " |"
    )
    kept = strict["retention_character1"]
    lines += [
        "",
        "Share of character1's confident gain kept after 3b: "
        + "; ".join(
            f"{v} {interval(r) if r else 'undefined (no confident gain in 3a)'}" for v, r in kept.items()
        )
        + ".",
        "",
        *(f"- {d['what']}: {points(d['difference'])}" for d in strict["differences"]),
        "",
    ]
    return lines


def _base_mean(accuracy: dict[str, float]) -> float:
    values = [v for k, v in accuracy.items() if not k.startswith("character")]
    return sum(values) / len(values)


STAGE_TITLES = {
    "base": "base",
    "character1": "3a +char1",
    "character2_plain": "3b plain",
    "character2_rehearsed": "3b rehearsed",
    "character2_preserved": "3b preserved",
    "merged": "merged",
}


def render_table(report: dict[str, Any]) -> Any:
    """The per-prompt accuracy table (rich) printed at the end of the demo."""
    from rich.table import Table

    cfg = report["config"]
    table = Table(
        title=f"judge accuracy per prompt (share of {cfg['samples']} samples classified as the "
        "intended digit)"
    )
    table.add_column("prompt")
    table.add_column("digit", justify="right")
    for stage in report["stages"]:
        table.add_column(STAGE_TITLES.get(stage, stage), justify="right")
    digits = {
        **{w: i for i, w in enumerate(DIGIT_WORDS)},
        "character1": cfg["character1"],
        "character2": cfg["character2"],
    }
    names = list(next(iter(report["stages"].values())))
    for name in names:
        style = "bold" if name.startswith("character") else None
        table.add_row(
            f"a digit {name}",
            str(digits[name]),
            *[f"{report['stages'][s][name]:.0%}" for s in report["stages"]],
            style=style,
        )
    s = report["summary"]
    table.add_section()
    table.add_row(
        "[bold]base classes (mean)",
        "",
        *[f"{_base_mean(report['stages'][st]):.0%}" for st in report["stages"]],
    )
    kept = ", ".join(
        f"{v}: character1 kept {s[f'character1_after_3b_{v}']:.0%}, character2 "
        f"{s[f'character2_after_3b_{v}']:.0%}, base classes {s[f'base_classes_after_3b_{v}']:.0%}"
        for v in report["character2_variants"]
    )
    table.caption = (
        f"character1 {s['character1_before']:.0%} -> {s['character1_after_3a']:.0%} (3a); after 3b "
        f"{kept}; merged file ({report['character2_merged']}) == base+deltas: "
        f"{s['merged_equals_deltas']}"
    )
    return table


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the same numbers as the terminal table, plus the setup and timings."""
    from .stack_report import time_lines
    cfg, s = report["config"], report["summary"]
    variants, merged_variant = report["character2_variants"], report["character2_merged"]
    stages = list(report["stages"])
    how = {
        "plain": "character2's data is its own scans and the base classes only (the seed's recipe)",
        "rehearsed": "character1's real scans are also mixed into character2's data (rehearsal)",
        "preserved": "no character1 scans; a preservation loss (weight "
        f"{cfg.get('preserve_weight', DEFAULT_WEIGHT)}, {cfg.get('preserve_items', 8)} pure-noise "
        "inputs per step) "
        "keeps the predictions for character1's recorded prompt, the empty prompt and the base "
        "prompts close to base + character1 (recommended)",
    }
    names = list(report["stages"][stages[0]])
    lines = [
        "# ffid demo report",
        "",
        f"Tiny Wan DiT ({report['model_params']:,} params) pretrained on scikit-learn's real digits; "
        f"character1 = digit {cfg['character1']} taught with `--ff {cfg['ff']} --ffid {cfg['ffid1']}`, "
        f"character2 = digit {cfg['character2']} with `--ffid {cfg['ffid2']}` on top, "
        f"{' and '.join(variants)} from the same state "
        f"(selector `{cfg['selector']}`, {cfg['steps']} steps each, lr {cfg['learning_rate']}, "
        f"seed {cfg['seed']}). Each character's data: the real scans of its digit plus "
        f"{cfg['prior_per_class']} real scans of each base class with their own prompts "
        "(regularisation). 3b "
        + "; 3b ".join(f"{v}: {how[v]}" for v in variants)
        + f". The merged checkpoint holds character1 and the {merged_variant} character2.",
        f"Samples are judged by an RBF SVM trained on real digits only "
        f"({report['judge_holdout_accuracy']:.1%} on held-out real scans); {cfg['samples']} samples per "
        "prompt, "
        f"{cfg['sample_steps']} Euler steps, guidance {cfg['guidance']}.",
        "",
        "## Summary",
        "",
        "| measure | " + " | ".join(f"3b {v}" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]

    def row(label: str, value: Callable[[str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(value(v) for v in variants) + " |")

    row("character1 accuracy before training", lambda v: f"{s['character1_before']:.1%}")
    row("character1 accuracy after 3a", lambda v: f"{s['character1_after_3a']:.1%}")
    row("character1 accuracy after 3b (retention)", lambda v: f"{s[f'character1_after_3b_{v}']:.1%}")
    row("character2 accuracy before training", lambda v: f"{s['character2_before']:.1%}")
    row("character2 accuracy after 3b", lambda v: f"{s[f'character2_after_3b_{v}']:.1%}")
    row("base-class accuracy before", lambda v: f"{s['base_classes_before']:.1%}")
    row("base-class accuracy after 3a", lambda v: f"{s['base_classes_after_3a']:.1%}")
    row(
        "base-class accuracy after 3b (damage = before - after)",
        lambda v: f"{s[f'base_classes_after_3b_{v}']:.1%}",
    )
    row(
        "merged checkpoint identical to base + both deltas",
        lambda v: str(s["merged_equals_deltas"]) if v == merged_variant else "(not merged)",
    )
    lines += [
        "",
        "## Per prompt",
        "",
        "| prompt | " + " | ".join(STAGE_TITLES.get(st, st) for st in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name in names:
        lines.append(
            f"| a digit {name} | " + " | ".join(f"{report['stages'][st][name]:.0%}" for st in stages) + " |"
        )
    c1 = report["characters"]["character1"]
    lines += ["", *render_strict(report)]
    lines += [
        "## Files",
        "",
        f"- base: `{report['files']['base']}` ({base_origin(report['files'])})",
        f"- character1 delta: `{c1['delta']}` ({c1['trainable']:,} weights, fingerprint {c1['fingerprint']})",
        *[
            f"- character2 {v} delta: `{c['delta']}` ({c['trainable']:,} weights, "
            f"fingerprint {c['fingerprint']})"
            for v, c in ((v, report["characters"][f"character2_{v}"]) for v in variants)
        ],
        f"- merged (character1 + character2 {merged_variant}): `{report['files']['merged']}`",
        "- sample grids: " + ", ".join(f"`samples/{st}.png`" for st in stages),
        "- loss curves: `loss.png`; TensorBoard: `tensorboard --logdir logs`",
        "",
        *time_lines(report),
    ]
    return "\n".join(lines)
