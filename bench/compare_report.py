"""bench/compare.py's report: its tables, the issue's targets (PASS/MISS) and its figure.

Everything here reads measured results (the dicts the .json keeps); nothing trains.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compare_methods import MATCH_FF

WELL_BELOW = 0.8  # "well below" = at most 80% of the other method's step time
MEM_SLACK = 0.10
BYTES_PER_TRAINABLE = 16  # fp32 value + gradient + two AdamW moments


def fmt_bytes(n: float | None) -> str:
    from _common import human_bytes

    return human_bytes(n)


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.1f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(results: list[dict[str, Any]]) -> str:
    by = {r["label"]: r for r in results}
    floor, lora = by.get("floor"), by.get("lora")
    rows = []
    for r in results:
        rows.append(
            [
                r["label"],
                f"{r['trainable']:,}"
                + (f" ({r['trainable'] / r['total_params']:.2%})" if r["trainable"] else ""),
                fmt_ms(r["step_s"]),
                ratio(r["step_s"], floor and floor["step_s"]),
                ratio(r["step_s"], lora and lora["step_s"]),
                fmt_bytes(r["peak_mem"]),
                fmt_bytes(r["peak_above_model"]),
                ratio(r["peak_above_model"], floor and floor["peak_above_model"]),
                ratio(r["peak_above_model"], lora and lora["peak_above_model"]),
                fmt_bytes(r["opt_state_bytes"]),
                fmt_bytes(r["output_bytes"]),
                "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
            ]
        )
    header = [
        "method",
        "trainable",
        "step ms",
        "vs floor",
        "vs LoRA",
        "peak mem",
        "above model",
        "vs floor",
        "vs LoRA",
        "optimizer state",
        "output file",
        "loss after N",
    ]
    return md_table(header, rows)


def ff_table(results: list[dict[str, Any]]) -> str:
    by = {r["label"]: r for r in results}
    floor = by["floor"]
    rows = []
    for r in [floor] + [r for r in results if r["method"] == "ffid"]:
        rows.append(
            [
                "0 (floor)" if r is floor else f"{r['ff']:g}",
                f"{r['trainable']:,}",
                fmt_ms(r["step_s"]),
                ratio(r["step_s"], floor["step_s"]),
                fmt_bytes(r["peak_above_model"]),
                fmt_bytes(r["peak_above_model"] - floor["peak_above_model"]),
                fmt_bytes(BYTES_PER_TRAINABLE * r["trainable"]),
            ]
        )
    return md_table(
        ["ff", "trainable", "step ms", "vs floor", "above model", "minus floor", "16 B x trainable"], rows
    )


def size_table(sweep: list[dict[str, Any]]) -> str:
    rows = []
    sizes = sorted(
        {r["size"] for r in sweep}, key=lambda s: next(r["total_params"] for r in sweep if r["size"] == s)
    )
    for s in sizes:
        at = {r["method"]: r for r in sweep if r["size"] == s}
        f, fl, lo = at.get("ffid"), at.get("floor"), at.get("lora")
        if not (f and fl):
            continue
        rows.append(
            [
                s,
                f"{f['total_params']:,}",
                f"{f['trainable']:,}",
                fmt_ms(fl["step_s"]),
                fmt_ms(f["step_s"]),
                ratio(f["step_s"], fl["step_s"]),
                ratio(lo and lo["step_s"], fl["step_s"]),
                fmt_bytes(fl["peak_above_model"]),
                fmt_bytes(f["peak_above_model"]),
                fmt_bytes(lo and lo["peak_above_model"]),
            ]
        )
    header = [
        "size",
        "params",
        "ffid k",
        "floor ms",
        "ffid ms",
        "ffid/floor",
        "LoRA/floor",
        "floor above model",
        "ffid above model",
        "LoRA above model",
    ]
    return md_table(header, rows)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def check_targets(results: list[dict[str, Any]]) -> list[Check]:
    """The issue's targets at ff 0.01 with LoRA/SHiRA sized to the same trainable count."""
    by = {r["label"]: r for r in results}
    f, lora, shira, full, floor = (
        by.get(x) for x in (f"ffid@{MATCH_FF:g}", "lora", "shira", "full", "floor")
    )
    out: list[Check] = []
    if not (f and lora and shira and full and floor):
        return out

    def time_check(other: dict[str, Any], limit: float, what: str) -> Check:
        r = f["step_s"] / other["step_s"]
        return Check(
            f"ffid step time <= {limit:g} x {what}",
            r <= limit,
            f"{fmt_ms(f['step_s'])} vs {fmt_ms(other['step_s'])} ms = {r:.2f}x (margin {limit - r:+.2f})",
        )

    out.append(time_check(lora, 1.0, "LoRA"))
    out.append(time_check(shira, WELL_BELOW, "SHiRA"))
    out.append(time_check(full, WELL_BELOW, "full FT"))
    fm, lm = f["peak_above_model"], lora["peak_above_model"]
    out.append(
        Check(
            "ffid peak memory <= LoRA",
            fm <= lm,
            f"{fmt_bytes(fm)} vs {fmt_bytes(lm)} above the model (margin {fmt_bytes(lm - fm)})",
        )
    )
    limit = (floor["peak_above_model"] + BYTES_PER_TRAINABLE * f["trainable"]) * (1 + MEM_SLACK)
    out.append(
        Check(
            "ffid peak memory <= (floor + 16 B x trainable) + 10%",
            fm <= limit,
            f"{fmt_bytes(fm)} vs limit {fmt_bytes(limit)} (floor "
            f"{fmt_bytes(floor['peak_above_model'])} above the model; margin {fmt_bytes(limit - fm)})",
        )
    )
    if f["eval_loss"] is not None and lora["eval_loss"] is not None:
        fl, ll = f["eval_loss"], lora["eval_loss"]
        out.append(
            Check(
                "ffid loss after N steps <= LoRA",
                fl <= ll,
                f"{fl:.4f} vs {ll:.4f} (margin {ll - fl:+.4f}, {(ll - fl) / ll:+.1%})",
            )
        )
    if f.get("best_loss") is not None and lora.get("best_loss") is not None and len(f["loss_by_lr"]) > 1:
        fl, ll = f["best_loss"], lora["best_loss"]
        out.append(
            Check(
                "ffid loss after N <= LoRA, each at its best learning rate of the grid",
                fl <= ll,
                f"{fl:.4f} (lr {f['best_lr']:g}) vs {ll:.4f} (lr {lora['best_lr']:g}) "
                f"(margin {ll - fl:+.4f}, {(ll - fl) / ll:+.1%})",
            )
        )
    return out


def plot(results: list[dict[str, Any]], sweep: list[dict[str, Any]], path: Path) -> bool:
    """PNG: ffid's step time and memory against ff (left) and model size (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by = {r["label"]: r for r in results}
    floor = by["floor"]
    ffs = [r for r in results if r["method"] == "ffid"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    x = [r["ff"] for r in ffs]
    ax.plot(x, [r["step_s"] / floor["step_s"] for r in ffs], "o-", label="ffid step time / floor")
    for other, style in (("lora", "--"), ("shira", ":"), ("full", "-.")):
        if other in by:
            ax.axhline(by[other]["step_s"] / floor["step_s"], ls=style, color="gray", lw=1)
            ax.annotate(other, (x[0], by[other]["step_s"] / floor["step_s"]), fontsize=8, color="gray")
    ax.set_xscale("log")
    ax.set_xlabel("ff")
    ax.set_ylabel("step time / floor")
    ax2 = ax.twinx()
    ax2.plot(x, [r["peak_above_model"] / 2**20 for r in ffs], "s-", color="C1", label="ffid peak above model")
    ax2.axhline(floor["peak_above_model"] / 2**20, color="C1", lw=1, ls="--")
    floor_mib = floor["peak_above_model"] / 2**20
    ax2.annotate("floor memory", (x[-1], floor_mib), fontsize=8, color="C1", ha="right")
    ax2.set_ylabel("peak memory above model (MiB)", color="C1")
    ax.set_title(f"ffid vs ff ({results[0]['size']}, {results[0]['device']})")
    ax = axes[1]
    sizes = sorted(
        {r["size"] for r in sweep}, key=lambda s: next(r["total_params"] for r in sweep if r["size"] == s)
    )
    for method, style in (("ffid", "o-"), ("lora", "s--")):
        pts = []
        for s in sizes:
            at = {r["method"]: r for r in sweep if r["size"] == s}
            if method in at and "floor" in at:
                pts.append((at[method]["total_params"], at[method]["step_s"] / at["floor"]["step_s"]))
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=f"{method} step time / floor")
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("step time / floor")
    ax.set_title(f"growth with model size (ff {MATCH_FF:g})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    k: int,
    rank: int,
    elapsed: float,
    command: str,
) -> tuple[str, list[Check]]:
    first = results[0]
    lines = [
        f"Command: `{command}`",
        "",
        f"Device: {first['device_name']} ({args.device}, {args.dtype}). Model: Wan DiT size {args.size!r}, "
        f"{first['total_params']:,} parameters; {args.image_size}x{args.image_size} digits "
        f"({(args.image_size // 2) ** 2} tokens), batch {args.batch}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per method (N = {args.warmup + args.steps}), AdamW lr {args.lr:g}, "
        f"no weight decay, seed {args.seed}; "
        f"base pretrained {args.pretrain_steps} steps on upright digits, finetuned on mirrored digits. "
        f"ffid k at ff {MATCH_FF:g} = {k:,}; LoRA rank = SHiRA r = {rank}. "
        + ("Gradient checkpointing of the blocks on (every method). " if args.checkpointing else "")
        + f"Wall time {elapsed:.0f} s.",
        "",
        "step ms: median wall time of a training step (forward, backward, optimizer step), warm-up excluded. "
        + (
            "peak mem: CUDA max_memory_allocated; above model: minus what was allocated once the model and "
            "data were loaded."
            if args.device.startswith("cuda")
            else "peak mem: peak resident set size of the method's own process (Linux VmHWM); above model: "
            "the peak minus the RSS once the model and data were loaded (setup + training)."
        )
        + " optimizer state: bytes of the tensors in optimizer.state. loss after N: flow-matching loss "
        "on fixed held-out draws of the task (floor = the base model, untrained).",
        "",
        main_table(results),
    ]
    if args.in_process:
        lines += [
            "",
            "(--in-process: memory was probed one method after another in one process, so the peaks "
            "are approximate; the first method pays for allocations the others reuse.)",
        ]
    if any(r["method"] == "ffid" for r in results) and any(r["label"] == "floor" for r in results):
        lines += ["", "ffid against ff (same model):", "", ff_table(results)]
    all_sweep = sweep + [r for r in results if r["label"] in ("floor", f"ffid@{MATCH_FF:g}", "lora")]
    if sweep:
        lines += [
            "",
            f"Growth with model size (ff {MATCH_FF:g}, random init, {args.sweep_steps} timed steps):",
            "",
            size_table(all_sweep),
        ]
    if getattr(args, "lrs", None):
        lines += [
            "",
            f"Loss after N by learning rate (same data, steps and seed; each method's best in bold; "
            f"the tables above use lr {args.lr:g}):",
            "",
            lr_table(results, args.lrs),
        ]
    if args.failures:
        lines += ["", "Methods that failed (not measured):", ""] + [f"- {f}" for f in args.failures]
    checks = check_targets(results)
    if checks:
        lines += ["", f"Targets (ff {MATCH_FF:g}, LoRA/SHiRA at rank {rank}):", ""]
        lines += [f"- {'PASS' if c.ok else 'MISS'}: {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines), checks


def lr_table(results: list[dict[str, Any]], lrs: list[float]) -> str:
    rows = []
    for r in results:
        if r["label"] == "floor":
            continue
        cells = []
        for lr in lrs:
            v = r["loss_by_lr"].get(lr)
            text = "-" if v is None else f"{v:.4f}"
            cells.append(f"**{text}**" if lr == r["best_lr"] else text)
        rows.append([r["label"], *cells])
    return md_table(["method", *[f"lr {lr:g}" for lr in lrs]], rows)
