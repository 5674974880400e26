#!/usr/bin/env python
"""What protection by projection costs: the feature pass against a run, a projected step against a
plain one and against LoRA's, and the bases' memory against the trainable state, side by side in
one process.

The demo's tiny Wan DiT at each ``--widths`` (random weights: the cost does not depend on what
they hold), the demo's projection recipe (whole rows of the blocks' Linears, ``--ff``, 10 slots),
and the protected prompts of a fourth stacked character (six base classes, three earlier
characters, the empty prompt). Steps are timed interleaved (plain, projected, plain, ...) on the
same batch, so load hits all alike; the ratios are of medians. LoRA is PEFT LoRA rank-matched to
ffid spread at ff 0.01 on the blocks' attention and FFN Linears, as in bench/stack.py. The trainable
state is measured from the objects after the timed steps: the trained tensors plus the tensors in
the optimizer's state (AdamW's two moments).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # interference_methods, run as a script
LORA_FF = 0.01  # LoRA is rank-matched to ffid spread at this budget, as in bench/stack.py
STEPS_PER_RUN = 300  # the demo's steps per character
BATCH = 32
PROMPTS = (
    [f"a digit {w}" for w in ("zero", "two", "three", "five", "six", "eight")]
    + [f"a digit character{i}" for i in (1, 2, 3)]
    + [""]
)


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

    # Three copies of the model: one attached plainly, one projected, one with LoRA; their steps
    # alternate.
    import copy

    from interference_methods import add_lora, matched_lora_rank

    models = {"plain": model, "projected": copy.deepcopy(model)}
    rank = matched_lora_rank(model, LORA_FF, 1, "spread")
    models["lora"] = add_lora(copy.deepcopy(model), rank)
    lora_params = [p for p in models["lora"].parameters() if p.requires_grad]
    opts: dict[str, torch.optim.Optimizer] = {"lora": torch.optim.AdamW(lora_params, lr=1e-3)}
    feature_seconds, info = 0.0, {}
    handles = []
    for kind in ("plain", "projected"):
        m = models[kind]
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

    times: dict[str, list[float]] = {kind: [] for kind in models}
    for r in range(warmup + rounds):
        for kind in models:
            dt = step(kind)
            if r >= warmup:
                times[kind].append(dt)
    projected_state = state_bytes(handles[1].parameters(), opts["projected"])
    lora_state = state_bytes(lora_params, opts["lora"])
    for handle in handles:
        handle.detach()
    plain, projected = statistics.median(times["plain"]), statistics.median(times["projected"])
    lora = statistics.median(times["lora"])
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
        "lora_step_s": lora,
        "projected_vs_lora": projected / lora,
        "lora_rank": rank,
        "lora_values": sum(p.numel() for p in lora_params),
        # measured: the trained values + AdamW's moments (what a plain run holds too); then what
        # projection adds, the start values (one more proxy-sized tensor) and the bases
        "trainable_state_bytes": projected_state,
        "lora_state_bytes": lora_state,
        "projection_extra_bytes": 4 * k + info["basis_bytes"],
        **info,
    }


def state_bytes(params: Any, opt: torch.optim.Optimizer) -> int:
    """Bytes of the trained tensors and of every tensor in the optimizer's state."""
    held = list(params) + [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in held)


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| width | ff | params | plain step | projected step | ratio | feature pass "
        "| share of a 300-step run "
        "| LoRA step (rank) | projected vs LoRA | trained values: projection / LoRA "
        "| trainable state: projection / LoRA | projection adds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['ff']} | {r['params']:,} | {r['plain_step_s'] * 1e3:.1f} ms | "
            f"{r['projected_step_s'] * 1e3:.1f} ms | {r['step_ratio']:.3f}x | {r['feature_pass_s']:.2f} s | "
            f"{r['feature_share_of_run']:.1%} | {r['lora_step_s'] * 1e3:.1f} ms (r {r['lora_rank']}) | "
            f"{r['projected_vs_lora']:.3f}x | {r['trained_values']:,} / {r['lora_values']:,} | "
            f"{r['trainable_state_bytes'] / 1024:.0f} / {r['lora_state_bytes'] / 1024:.0f} KiB | "
            f"{r['projection_extra_bytes'] / 1024:.0f} KiB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--ff", type=float, nargs="+", default=[0.05, 0.01], help="projection's budgets")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(w, ff, args.rounds, args.warmup) for w in args.widths for ff in args.ff]
    table = render(rows)
    head = (
        f"# Projection cost (CPU, {args.threads} thread(s), torch {torch.__version__})\n\n"
        f"`python bench/projection_cost.py --widths {' '.join(map(str, args.widths))} "
        f"--ff {' '.join(map(str, args.ff))} "
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
