"""The stacked demo's report (``ffid demo --characters ...``): the strict judge's numbers as JSON
(``report.json``), then ``report.md`` and the console summary, which read that dict only.

Every cell is the strict judge's (:mod:`.judge`): *confident* accuracy (calibrated p(intended
digit) >= 0.8) and argmax accuracy, each with its bootstrap 95% interval. Retention is the share
of a character's confident gain kept, ``(final - before) / (own - before)``, where *own* is the
stage right after its own run and *final* the merged file (for the merged sequence) or the last
stage. Differences are computed from the stored per-sample hits and called *beyond noise* when
their 95% interval excludes 0. The formatting helpers are shared with ``bench/stack_report.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from .judge import RESAMPLES, Estimate, bootstrap_mean, difference, hits_of, retention
from .shipped import base_origin

MEASURES = ("confident", "argmax")
# the sequences of a stacked run (ffid.demo.stacking)
METHOD_TITLES = {
    "preserved": "sequential, preserved",
    "plain": "sequential, plain (no preservation)",
    "parallel": "parallel (each from the base), then merged",
}


def pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def interval(e: dict[str, Any] | None) -> str:
    """``83% [75–90%]``; an unbounded end (a gain lost in the noise) is ∞."""
    if e is None:
        return "-"
    low = "−∞" if e["low"] is None else f"{e['low'] * 100:.0f}"
    high = "∞" if e["high"] is None else f"{e['high'] * 100:.0f}"
    return f"{pct(e['value'])} [{low}–{high}%]"


def points(d: dict[str, Any]) -> str:
    """A difference in points with its interval, and whether it exceeds its noise."""
    return (
        f"{d['value'] * 100:+.1f} points [{d['low'] * 100:+.1f}, {d['high'] * 100:+.1f}], "
        f"{'beyond noise' if beyond_noise(d) else 'within noise'}"
    )


def beyond_noise(d: dict[str, Any]) -> bool:
    """Whether a difference's 95% interval excludes 0."""
    return not (d["low"] <= 0 <= d["high"])


def pool(
    scores: dict[str, Any], names: Sequence[str], measure: str, seed: int, resamples: int = RESAMPLES
) -> Estimate:
    """One estimate over several prompts' samples (equal counts: the mean of their shares)."""
    return bootstrap_mean(np.concatenate([hits_of(scores[n], measure) for n in names]), resamples, seed)


def _est(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else e.to_dict()


def columns_of(report: dict[str, Any], method: str) -> list[tuple[str, dict[str, Any]]]:
    """``(title, scores)`` of every stage of ``method``: before, after each run, the merged file."""
    stages = report["sequences"][method]["stages"]
    cols = [("before", report["before"])]
    cols += [(f"after {s.get('label', s['name'])}", s["scores"]) for s in stages]
    if report["merged"]["method"] == method:
        cols.append(("merged file", report["merged"]["scores"]))
    return cols


def build_stack_report(
    cfg: Any,
    total: int,
    judge: Any,
    before: dict[str, Any],
    sequences: dict[str, dict[str, Any]],
    merged: dict[str, Any],
    files: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The report as plain JSON-ready values, with each sequence's summary and the differences."""
    report: dict[str, Any] = {
        "kind": "stack",
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "spec"}, "spec": cfg.spec.to_dict()},
        "model_params": total,
        "judge": {
            "holdout_argmax": judge.holdout_accuracy,
            "holdout_confident": judge.holdout_confident,
            "confident_at": judge.confident_at,
            "resamples": RESAMPLES,
        },
        "characters": [
            {"name": f"character{i}", "digit": d, "ffid": i} for i, d in enumerate(cfg.characters, 1)
        ],
        "base_classes": [n for n in before if not n.startswith("character")],
        "stacking": cfg.stacking,
        "before": before,
        "sequences": sequences,
        "merged": merged,
        "files": {**files, **{f"{m}_deltas": [r["delta"] for r in s["runs"]] for m, s in sequences.items()}},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": cfg.threads,
    }
    report["summary"] = {m: summarize(report, m) for m in sequences}
    report["differences"] = differences(report)
    return report


def _final(report: dict[str, Any], method: str) -> dict[str, Any]:
    return columns_of(report, method)[-1][1]


def _judged_later(report: dict[str, Any], method: str, name: str) -> bool:
    """Whether ``method``'s final column holds other weights than ``name``'s own stage: a later
    run, or a merged file that was sampled anew (a parallel merge)."""
    merged = report["merged"]
    if merged["method"] == method and merged["resampled"]:
        return True
    return report["sequences"][method]["stages"][-1]["name"] != name


def summarize(report: dict[str, Any], method: str) -> dict[str, Any]:
    """One sequence's retention (confident, with interval) per character and its pooled base classes."""
    seed = report["config"]["seed"]
    chars = [c["name"] for c in report["characters"]]
    bases = report["base_classes"]
    stages = {s["name"]: s["scores"] for s in report["sequences"][method]["stages"]}
    before, final = report["before"], _final(report, method)
    own = {c: stages[c][c] for c in chars}
    out: dict[str, Any] = {"final": columns_of(report, method)[-1][0]}
    out["retention"] = {
        c: _est(retention(hits_of(before[c]), hits_of(own[c]), hits_of(final[c]), seed=seed))
        for c in chars
        if _judged_later(report, method, c)  # else it has nothing to keep yet
    }
    for m in MEASURES:
        out[f"own_{m}"] = {c: own[c][m] for c in chars}
        out[f"final_{m}"] = {c: final[c][m] for c in chars}
        out[f"mean_{m}_final"] = _est(
            bootstrap_mean(np.concatenate([hits_of(final[c], m) for c in chars]), seed=seed)
        )
        out[f"base_{m}"] = {
            "before": _est(pool(before, bases, m, seed)),
            "after_character1": _est(pool(stages["character1"], bases, m, seed)),
            "final": _est(pool(final, bases, m, seed)),
        }
    return out


def differences(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparisons the report makes, each with its interval and whether it exceeds its noise."""
    seed = report["config"]["seed"]
    chars = [c["name"] for c in report["characters"]]
    bases = report["base_classes"]
    out = []

    def add(what: str, a: np.ndarray, b: np.ndarray) -> None:
        d = difference(a, b, seed=seed).to_dict()
        out.append({"what": what, "difference": d, "beyond_noise": beyond_noise(d)})

    def base_hits(scores: dict[str, Any]) -> np.ndarray:
        return np.concatenate([hits_of(scores[n]) for n in bases])

    for m in report["sequences"]:
        stages = {s["name"]: s["scores"] for s in report["sequences"][m]["stages"]}
        final_title, final = columns_of(report, m)[-1]
        for c in chars:
            if _judged_later(report, m, c):
                add(
                    f"{m}: {c} {final_title} minus after its own run",
                    hits_of(final[c]),
                    hits_of(stages[c][c]),
                )
        add(f"{m}: base classes {final_title} minus before", base_hits(final), base_hits(report["before"]))
    seqs = report["sequences"]
    if "preserved" in seqs and "plain" in seqs:
        pres = {s["name"]: s["scores"] for s in seqs["preserved"]["stages"]}
        plain = {s["name"]: s["scores"] for s in seqs["plain"]["stages"]}
        for c in chars:
            add(f"{c} after its own run: preserved minus plain", hits_of(pres[c][c]), hits_of(plain[c][c]))
        last = chars[-1]
        for c in chars[:-1]:
            add(f"{c} after all: preserved minus plain", hits_of(pres[last][c]), hits_of(plain[last][c]))
    return out


def _cell(score: dict[str, Any] | None) -> str:
    if score is None:
        return "-"
    return f"{interval(score['confident'])} · {interval(score['argmax'])}"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def matrix(report: dict[str, Any], method: str) -> list[str]:
    """The retention matrix of one sequence: every prompt (characters, base classes pooled, then
    each base class) after each stage."""
    seed = report["config"]["seed"]
    cols = columns_of(report, method)
    bases = report["base_classes"]
    rows = [
        [f"{c['name']} (digit {c['digit']}, id {c['ffid']})", *(_cell(s.get(c["name"])) for _, s in cols)]
        for c in report["characters"]
    ]
    pooled = [
        {m: pool(s, bases, m, seed).to_dict() for m in MEASURES} if all(b in s for b in bases) else None
        for _, s in cols
    ]  # a stage that sampled no base class (the contrast's middle stages) shows '-'
    rows.append([f"**base classes ({len(bases)}, pooled)**", *(_cell(p) for p in pooled)])
    rows += [[f"{b}", *(_cell(s.get(b)) for _, s in cols)] for b in bases]
    return _md_table(["prompt", *(t for t, _ in cols)], rows)


def _setup(report: dict[str, Any]) -> str:
    cfg, j = report["config"], report["judge"]
    chars = ", ".join(
        f"{c['name']} = digit {c['digit']} in `--ffid {c['ffid']}`" for c in report["characters"]
    )
    return (
        f"Tiny Wan DiT ({report['model_params']:,} params) pretrained on scikit-learn's real digits except "
        f"{' '.join(map(str, sorted(cfg['held_out_digits'] or cfg['characters'])))}; {chars} "
        f"({cfg['steps']} steps each, preservation by {cfg['preserve_method']}, seed {cfg['seed']}). "
        f"Judge: an RBF SVM trained on real scans only ({j['holdout_argmax']:.1%} argmax, "
        f"{j['holdout_confident']:.1%} confident on held-out real scans), calibrated (isotonic). "
        f"{cfg['character_samples']} samples per character prompt and {cfg['samples']} per base class at "
        f"every stage (the same seeds), {cfg['sample_steps']} Euler steps, guidance {cfg['guidance']}. "
        f"Cells: **confident** accuracy (p(intended digit) >= {j['confident_at']}) · argmax accuracy, each "
        f"with its bootstrap 95% interval ({j['resamples']} resamples). Retention = (final − before) / "
        "(after its own run − before) on confident accuracy, each stage resampled independently."
    )


def render_stack_markdown(report: dict[str, Any]) -> str:
    """``report.md``: setup, one retention matrix per sequence, the differences, files and time."""
    lines = [f"# ffid demo report: {len(report['characters'])} characters stacked", "", _setup(report), ""]
    for m in report["sequences"]:
        s = report["summary"][m]
        lines += [f"## {METHOD_TITLES[m]}", "", *matrix(report, m), ""]
        if s["retention"]:
            kept = "; ".join(
                f"{c} {interval(r) if r else 'undefined (no confident gain)'}"
                for c, r in s["retention"].items()
            )
            lines += [f"Share of each character's confident gain kept ({s['final']}): {kept}.", ""]
    lines += ["## Differences and their noise", ""]
    lines += [f"- {d['what']}: {points(d['difference'])}" for d in report["differences"]]
    merged, f = report["merged"], report["files"]
    lines += [
        "",
        "## Files",
        "",
        f"- base: `{f['base']}` ({base_origin(f)})",
        *(f"- {m} deltas: " + ", ".join(f"`{p}`" for p in f[f"{m}_deltas"]) for m in report["sequences"]),
        f"- merged ({merged['method']} deltas): `{f['merged']}`; identical to base + those deltas: "
        f"{merged['same_as_deltas']}"
        + ("" if merged["resampled"] else " (so its scores are the last stage's)"),
        "- sample grids: `samples/*.png`; loss curves: `loss.png`; TensorBoard: "
        "`tensorboard --logdir <method>/logs`",
        "",
        *time_lines(report),
    ]
    return "\n".join(lines)


def time_lines(report: dict[str, Any]) -> list[str]:
    """The "Time" section of a demo report (both kinds of demo)."""
    return [
        "## Time",
        "",
        f"Total {report['seconds']:.0f} s on {report['threads']} threads ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
        + f"); {report['peak_memory']}.",
        "",
    ]


def render_stack_summary(report: dict[str, Any]) -> str:
    """The console's summary: each sequence's confident accuracy per character and stage."""
    out = []
    for m in report["sequences"]:
        cols = columns_of(report, m)
        out.append(f"{METHOD_TITLES[m]} (confident accuracy; " + " | ".join(t for t, _ in cols) + ")")
        for c in report["characters"]:
            cells = [pct(s[c["name"]]["confident"]["value"]) if c["name"] in s else "-" for _, s in cols]
            out.append(f"  {c['name']} (digit {c['digit']}): " + " | ".join(cells))
        kept = report["summary"][m]["retention"]
        if kept:
            out.append("  kept: " + ", ".join(f"{c} {interval(r)}" for c, r in kept.items()))
    beyond = [d for d in report["differences"] if d["beyond_noise"]]
    if beyond:
        out.append(
            "beyond noise: "
            + "; ".join(f"{d['what']} {d['difference']['value'] * 100:+.0f} points" for d in beyond)
        )
    return "\n".join(out)
