"""bench/interference.py's report: the table of each seed, the issue's targets (PASS/MISS) and
the table over seeds.

Everything here reads a run's results (the dicts its .json keeps); nothing trains.
"""

from __future__ import annotations

import argparse
from typing import Any

from compare_report import md_table
from interference_methods import METHODS

TITLES = {
    "ffid plain": "ffid plain",
    "ffid rehearsed": "ffid rehearsed",
    "ffid preserved": "ffid preserved",
    "ffid preserved compat-v2": "ffid preserved + compat-v2",
    "lora": "LoRA sequential",
    "full": "full FT sequential",
}
TARGETED = ("ffid preserved", "ffid preserved compat-v2")  # the methods the targets are about
# The targets
KEEP = 0.90  # character1 keeps >= 90% of its gain
REACH = 0.90  # character2 reaches >= 90%
BASE_POINTS = 0.02  # base classes after 3b at most 2 points below after 3a
TIME_LIMIT = 1.6  # preserved step time <= 1.6x plain
MEM_SLACK = 0.10  # peak memory <= plain + 10%


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def seed_table(r: dict[str, Any], memory: dict[str, dict[str, Any]] | None) -> str:
    rows = []
    for m in METHODS:
        x = r["methods"][m]
        mem_cells = ["-", "-", "-"]
        if memory is not None:
            mem, plain = memory[m], memory["ffid plain"]["peak_above_base"]
            mem_cells = [
                f"{mem['peak_mem'] / 2**20:.1f} MiB",
                f"{mem['peak_above_base'] / 2**20:.1f} MiB",
                f"{mem['peak_above_base'] / plain:.2f}x",
            ]
        rows.append(
            [
                TITLES[m],
                f"{x['trainable']:,}",
                " → ".join(pct(x[f"character1_{s}"]) for s in ("before", "after_3a", "after_3b")),
                pct(x["retention"]),
                f"{pct(x['character2_before'])} → {pct(x['character2_after_3b'])}",
                f"{pct(x['base_before'])} / {pct(x['base_after_3a'])} / {pct(x['base_after_3b'])}",
                f"{(x['base_after_3b'] - x['base_after_3a']) * 100:+.1f}",
                f"{x['step_s'] * 1000:.1f}",
                f"{x['step_ratio']:.2f}x",
                *mem_cells,
            ]
        )
    header = [
        "method",
        "trainable",
        "character1 before → 3a → 3b",
        "char1 retention",
        "character2 before → 3b",
        "base classes before / 3a / 3b",
        "base 3b−3a (points)",
        "step ms",
        "step vs plain",
        "peak RSS",
        "peak above loaded",
        "above-loaded vs plain",
    ]
    return md_table(header, rows)


def checks(r: dict[str, Any], memory: dict[str, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """PASS/MISS of the issue's targets for the preserved methods (memory only when measured)."""
    out = []
    for m in TARGETED:
        x = r["methods"][m]
        ret = x["retention"]
        base_drop = x["base_after_3a"] - x["base_after_3b"]
        targets = [
            (
                f"character1 keeps >= {KEEP:.0%} of its gain",
                ret is not None and ret >= KEEP,
                f"retention {pct(ret)} ({pct(x['character1_before'])} → {pct(x['character1_after_3a'])} → "
                f"{pct(x['character1_after_3b'])})",
            ),
            (
                f"character2 reaches >= {REACH:.0%}",
                x["character2_after_3b"] >= REACH,
                pct(x["character2_after_3b"]),
            ),
            (
                f"base classes after 3b within {BASE_POINTS * 100:.0f} points of after 3a",
                base_drop <= BASE_POINTS + 1e-9,
                f"{pct(x['base_after_3a'])} → {pct(x['base_after_3b'])} ({-base_drop * 100:+.1f} points)",
            ),
            (
                f"step time <= {TIME_LIMIT}x ffid plain",
                x["step_ratio"] <= TIME_LIMIT,
                f"{x['step_ratio']:.2f}x",
            ),
        ]
        if memory is not None:
            plain_mem = memory["ffid plain"]["peak_above_base"]
            mem_ratio = memory[m]["peak_above_base"] / plain_mem
            targets.append(
                (
                    f"peak memory <= ffid plain + {MEM_SLACK:.0%}",
                    mem_ratio <= 1 + MEM_SLACK,
                    f"{mem_ratio:.2f}x of plain's peak above the loaded libraries "
                    f"({memory[m]['peak_above_base'] / 2**20:.1f} vs {plain_mem / 2**20:.1f} MiB)",
                )
            )
        for name, ok, detail in targets:
            out.append({"method": m, "target": name, "ok": bool(ok), "detail": detail})
    return out


def render(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    memory: dict[str, dict[str, Any]] | None,
    command: str,
    elapsed: float,
) -> str:
    cfg = results[0]["config"]
    lines = [
        "# Interference benchmark",
        "",
        f"Command: `{command}` ({elapsed:.0f} s wall in all, machine shared).",
        "",
        f"The `ffid demo` task: tiny Wan DiT ({cfg['spec']['dim']} dim, {cfg['spec']['layers']} blocks) "
        f"pretrained {cfg['pretrain_steps']} steps on the digits except {cfg['character1']} and "
        f"{cfg['character2']} (one base per seed); character1 = digit {cfg['character1']}, "
        f"character2 = digit {cfg['character2']}; every method: {cfg['steps']} steps per character, "
        f"batch {cfg['batch_size']}, "
        f"{cfg['prior_per_class']} prior scans per base class, same batch order and noise (seed + id), "
        f"gradient clipping 1.0, AdamW (torch defaults), constant lr. ffid: ff {cfg['ff']}, lr "
        f"{cfg['learning_rate']:g}, ids {cfg['ffid1']}/{cfg['ffid2']}, selector `{cfg['selector']}` "
        f"(compat-v2 row: `compat-v2`); preservation weight {cfg['preserve_weight']}, "
        f"{cfg['preserve_items']} items per step. LoRA: lr {args.lora_lr:g}, rank matched to ffid's "
        f"trainable count on every attention/FFN Linear of the blocks (as bench/compare.py), merged after "
        f"each character. Full FT: lr {args.full_lr:g}. (Learning rates: each baseline's best of "
        "bench/compare.py's grid on this model family; see docs/interference.md.)",
        "",
        f"Scores: {cfg['samples']} samples per prompt, {cfg['sample_steps']} Euler steps, guidance "
        f"{cfg['guidance']}, judged by the demo's SVM. Retention = (char1 after 3b − before) / (char1 after "
        "3a − before). base classes = mean accuracy over the 8 base digits. step ms: median of "
        f"{args.time_steps} character2 steps per method after {args.warmup} warm-up, all methods "
        "interleaved in one process in rotating order on the same batch (ratios are what counts). "
        f"peak: {args.mem_steps} character2 steps in a fresh process per method"
        + (" (--in-process: one process, approximate)" if args.in_process else "")
        + "; 'above loaded' = peak RSS minus the RSS with libraries and data loaded, before the model is "
        "built (model + deltas + setup + training); measured on the first seed's base, the same shapes "
        "for every seed.",
    ]
    for r in results:
        lines += ["", f"## Seed {r['seed']}", "", seed_table(r, memory), ""]
        for c in r["checks"]:
            lines.append(
                f"- {'PASS' if c['ok'] else 'MISS'} ({TITLES[c['method']]}): {c['target']}: {c['detail']}"
            )
        how = "cached" if r["base_cached"] else f"pretrained in {r['pretrain_s']:.0f} s"
        lines += [
            "",
            f"Seed {r['seed']}: {r['seconds']:.0f} s (base {how}); "
            + ", ".join(f"{k} {v:.0f} s" for k, v in r["timings_s"].items()),
        ]
    if len(results) > 1:
        lines += ["", "## Over seeds", "", summary_table(results)]
    return "\n".join(lines) + "\n"


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for m in METHODS:
        xs = [r["methods"][m] for r in results]
        rows.append(
            [
                TITLES[m],
                " / ".join(pct(x["retention"]) for x in xs),
                " / ".join(pct(x["character2_after_3b"]) for x in xs),
                " / ".join(f"{(x['base_after_3b'] - x['base_after_3a']) * 100:+.1f}" for x in xs),
                " / ".join(f"{x['step_ratio']:.2f}x" for x in xs),
            ]
        )
    seeds = "seeds " + " / ".join(str(r["seed"]) for r in results)
    return md_table(
        [
            "method",
            f"char1 retention ({seeds})",
            "character2 after 3b",
            "base 3b−3a (points)",
            "step vs plain",
        ],
        rows,
    )
