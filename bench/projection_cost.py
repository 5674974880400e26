#!/usr/bin/env python
"""What protection by projection costs: the feature pass against a run, a projected step against a
plain one, and the bases' memory against the trainable state, side by side in one process.

The demo's tiny Wan DiT at each ``--widths`` (random weights: the cost does not depend on what
they hold), the demo's projection recipe (whole rows of the blocks' Linears, ``--ff``, 10 slots),
and the protected prompts of a fourth stacked character (six base classes, three earlier
characters, the empty prompt). Steps are timed interleaved (plain, projected, plain, ...) on the
same batch, so load hits both alike; the ratio is of medians.

    python bench/projection_cost.py                      # widths 64 128 256
    python bench/projection_cost.py --widths 64 --rounds 5 --out /tmp   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STEPS_PER_RUN = 300  # the demo's steps per character
BATCH = 32
PROMPTS = [f"a digit {w}" for w in ("zero", "two", "three", "five", "six", "eight")] + [
    f"a digit character{i}" for i in (1, 2, 3)
] + [""]


def measure(width: int, ff: float, rounds: int, warmup: int) -> dict[str, Any]:
    from ffid.demo.data import encode_prompt
    from ffid.demo.model import ModelSpec, build_model, flow_matching_loss
    from ffid.demo.task import DemoTask
    from ffid.engine import attach
    from ffid.preserve import ProjectionSettings, Projector, Protected

    spec = ModelSpec(dim=width, heads=max(1, width // 16), ffn_dim=2 * width)
    model = build_model(spec, seed=0)
    task = DemoTask([], model=model, spec=spec)  # only its sampler and forward are used
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, 1, 1, spec.image_size, spec.image_size, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.rand(BATCH, generator=g)
    text = encode_prompt("a digit character4").expand(BATCH, -1, -1)

    # Two copies of the model, one attached plainly, one projected; their steps alternate.
    import copy

    models = {"plain": model, "projected": copy.deepcopy(model)}
    opts: dict[str, torch.optim.Optimizer] = {}
    feature_seconds, info = 0.0, {}
    handles = []
    for kind, m in models.items():
        handle = attach(m, ff=ff, ffid=4, selector="rows", include=[r"^blocks\."], slots=10)
        handles.append(handle)
        opts[kind] = torch.optim.AdamW(handle.parameters(), lr=1e-3)
        if kind == "projected":
            protected = [Protected(p, "bench") for p in PROMPTS]
            projector = Projector(handle, task, protected, ProjectionSettings())
            start = time.perf_counter()
            stats = projector.collect(m, torch.Generator().manual_seed(1))
            feature_seconds = time.perf_counter() - start
            projector.install(opts[kind])
            info = {
                "trained_values": sum(p.numel() for p in handle.parameters()),
                "basis_bytes": stats.basis_bytes,
                "groups": stats.groups,
                "ranks": {k: list(v) for k, v in stats.ranks.items()},
            }

    def step(kind: str) -> float:
        start = time.perf_counter()
        loss = flow_matching_loss(models[kind], x0, text, noise, t)
        loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"plain": [], "projected": []}
    for r in range(warmup + rounds):
        for kind in ("plain", "projected"):
            dt = step(kind)
            if r >= warmup:
                times[kind].append(dt)
    for handle in handles:
        handle.detach()
    plain, projected = statistics.median(times["plain"]), statistics.median(times["projected"])
    run_seconds = feature_seconds + STEPS_PER_RUN * projected
    k = info["trained_values"]
    return {
        "width": width,
        "ff": ff,
        "params": sum(p.numel() for p in model.parameters()),
        "plain_step_s": plain,
        "projected_step_s": projected,
        "step_ratio": projected / plain,
        "feature_pass_s": feature_seconds,
        "feature_share_of_run": feature_seconds / run_seconds,
        # proxies + AdamW's two moments (what a plain run holds), then what projection adds: the
        # start values (one more proxy-sized tensor) and the bases
        "trainable_state_bytes": 3 * 4 * k,
        "projection_extra_bytes": 4 * k + info["basis_bytes"],
        **info,
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| width | params | plain step | projected step | ratio | feature pass | share of a 300-step run "
        "| trainable state | projection adds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['params']:,} | {r['plain_step_s'] * 1e3:.1f} ms | "
            f"{r['projected_step_s'] * 1e3:.1f} ms | {r['step_ratio']:.3f}x | {r['feature_pass_s']:.2f} s | "
            f"{r['feature_share_of_run']:.1%} | {r['trainable_state_bytes'] / 1024:.0f} KiB | "
            f"{r['projection_extra_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--ff", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(w, args.ff, args.rounds, args.warmup) for w in args.widths]
    table = render(rows)
    head = (
        f"# Projection cost (CPU, {args.threads} thread(s), torch {torch.__version__})\n\n"
        f"`python bench/projection_cost.py --widths {' '.join(map(str, args.widths))} --ff {args.ff} "
        f"--rounds {args.rounds}`\n\n"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "projection-cost-cpu.md").write_text(head + table + "\n")
    (out / "projection-cost-cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    print(f"wrote {out / 'projection-cost-cpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
