"""Merge the parts' results (``<work>/part-*.json``, ``<work>/rc-*``) into ``gpu-report.json`` and
``gpu-report.md`` in ``--out``. A part with no result file, or one killed by its time limit,
is reported with its exit code and whatever cases it had saved."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit

PARTS = {
    "tests": "1. GPU tests and the matrix tests on the device",
    "shapes": "2. The engine at real Wan shapes",
    "14b": "3. The whole 14B, with and without block swap",
    "paths": "4. The gradient-path choice",
}


def collect(work: Path, dry_run: bool) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for name in PARTS:
        f, rc_file = work / f"part-{name}.json", work / f"rc-{name}"
        rc = int(rc_file.read_text().strip()) if rc_file.exists() else None
        data: dict[str, Any] = json.loads(f.read_text()) if f.exists() else {"part": name, "cases": []}
        data["exit_code"] = rc
        if not f.exists():
            data["status"] = "failed" if rc is not None else "not run"
        elif rc in (124, 137):  # timeout(1)'s exit codes: the part ran past its hard limit
            data["status"] = "timeout"
        elif rc not in (0, None) and data.get("status") in ("running", "ok"):
            data["status"] = "failed"
        parts[name] = data
    machine = next((p["machine"] for p in parts.values() if "machine" in p), None)
    return {"dry_run": dry_run, "machine": machine, "parts": parts}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):  # before int: bool is an int
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return out


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"] or {}
    lines = [
        "# ffid GPU report"
        + (" (DRY RUN: toy sizes on CPU, no figure here means anything)" if rep["dry_run"] else ""),
        "",
        f"Card: {m.get('card')} ({m.get('card_memory_gib')} GiB, capability {m.get('capability')}), "
        f"driver {m.get('driver')}, torch {m.get('torch')} (CUDA {m.get('cuda_runtime')}), "
        f"Python {m.get('python')}, {m.get('cpus')} CPUs.",
        "",
        "Memory is `torch.cuda.max_memory_allocated` over the timed steps (weights included, CUDA "
        "context excluded); step time is the median wall time of the timed steps after one warm-up "
        "step. bench/gpu/*.py docstrings and docs/gpu.md say what each figure is.",
        "",
    ]
    for name, title in PARTS.items():
        p = rep["parts"][name]
        lines += [f"## {title}: {p.get('status')}", ""]
        if p.get("exit_code") not in (0, None):
            lines += [
                f"Exit code {p['exit_code']}"
                + (" (ran past its time limit)" if p["status"] == "timeout" else ""),
                "",
            ]
        cases = p.get("cases", [])
        bad = [c for c in cases if c["status"] != "ok"]
        if name == "tests":
            lines += _table(cases, ["case", "status", "passed", "failures", "errors", "skipped", "command"])
            for c in cases:
                lines += [f"- {c['case']}: {f}" for f in c.get("failed", [])]
        elif name == "shapes":
            lines += [f"Clip: {_fmt(p.get('clip'))}.", ""]
            lines += _table(
                cases, ["case", "status", "trainable", "lora_rank", "step_s", "peak_gib", "grad_paths"]
            )
            if p.get("extrapolated"):
                lines += ["", "40-block extrapolation (1-block figure + 39 x per-block slope):", ""]
                lines += _table(
                    p["extrapolated"],
                    [
                        "variant",
                        "checkpointing",
                        "step_s",
                        "peak_gib",
                        "step_s_per_block",
                        "peak_gib_per_block",
                    ],
                )
            if p.get("against_estimate"):
                lines += ["", "ffid ff 0.01 with checkpointing, measured peak against `ffid estimate`:", ""]
                lines += _table(
                    p["against_estimate"],
                    ["run", "measured_peak_gib", "estimate_gib", "estimate_over_measured"],
                )
            names = {
                "width": "14B width, the larger block count",
                "14b": "wan2.1-t2v-14b, 40 blocks",
                "1.3b": "1.3B",
            }
            for key, est in (p.get("estimates") or {}).items():
                lines += [
                    "",
                    f"`ffid estimate` ({names.get(key, key)}, ff {p.get('ff')}, AdamW, bf16; its rough "
                    f"activations assume checkpointing): GPU total {est['gpu_total_gib']} GiB; "
                    f"parts: {_fmt(est['parts_gib'])}.",
                ]
        elif name == "14b":
            lines += [
                f"Parameters {_fmt(p.get('params'))}, built in {p.get('build_s')} s; "
                f"clip {_fmt(p.get('clip'))}.",
                "",
                "Swap plans from `ffid estimate` (+1 GiB context): "
                + "; ".join(f"{k}: {_fmt(v)}" for k, v in (p.get("swap_plans") or {}).items()),
                "",
            ]
            lines += _table(
                cases,
                [
                    "case",
                    "status",
                    "trainable",
                    "blocks_to_swap",
                    "block_moves_per_step",
                    "step_s",
                    "peak_gib",
                    "estimate_plus_context_gib",
                ],
            )
            if p.get("verdicts"):
                lines += ["", "Claims:", ""]
                lines += [f"- {_fmt(v)}" for v in p["verdicts"]]
        elif name == "paths":
            lines += [
                f"The rule's path was the fastest in {p.get('rule_was_fastest')} of {p.get('cases_timed')} "
                f"cases; worst rule / fastest: {p.get('worst_rule_vs_fastest')}.",
                "",
            ]
            lines += _table(
                cases,
                [
                    "case",
                    "status",
                    "selected",
                    "rule",
                    "fastest",
                    "rule_vs_fastest",
                    "frozen_backward_ms",
                    "path_ms",
                ],
            )
        for c in bad:
            lines.append(f"- {c['case']}: {c['status']}: {c.get('error') or c.get('why', '')}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    rep = collect(args.work, args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    kit.write_json(args.out / "gpu-report.json", rep)
    kit.write_text(args.out / "gpu-report.md", markdown(rep))
    print(
        f"wrote {args.out / 'gpu-report.md'} and gpu-report.json: "
        + ", ".join(f"{k} {v.get('status')}" for k, v in rep["parts"].items())
    )


if __name__ == "__main__":
    main()
