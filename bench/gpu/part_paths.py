"""Part 4: the gradient-path choice on CUDA: which path ``auto`` takes per Wan 14B layer, and the fastest.

``ffid.engine.paths.auto_path`` is a fixed rule (shape, selected count, dtype, device type; its
accelerator weights are estimates, never measured on a GPU). Here every weight shape of Wan
14B, at the token count it sees in a 480x832 x 81-frame step, is timed on each path: one
Linear with ffid attached (``grad_path`` forced), forward then backward, median of 3 backward
times after a warm-up, next to the same layer frozen (backward to the input only). A path's
cost is its backward minus the frozen backward. Per case: the rule's path, the fastest path,
and how much slower the rule's path is than the fastest.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit

TOKENS = 32760  # 480x832, 81 frames
TEXT = 512
# (weight, rows, cols, tokens it multiplies per step)
LAYERS = [
    ("blocks.N.self_attn.q", 5120, 5120, TOKENS),
    ("blocks.N.ffn.0", 13824, 5120, TOKENS),
    ("blocks.N.ffn.2", 5120, 13824, TOKENS),
    ("blocks.N.cross_attn.k", 5120, 5120, TEXT),
    ("text_embedding.0", 5120, 4096, TEXT),
    ("time_projection.1", 30720, 5120, 1),
]
FFS = (0.01, 0.00001, 0.001)


def backward_time(layer: Any, x: Any, bf16: bool, reps: int) -> float:
    import torch

    cuda = x.device.type == "cuda"
    times = []
    for _ in range(reps + 1):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = layer(x)
        loss = out.float().square().mean()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return statistics.median(times[1:])  # the first call warms kernels up


def one_case(rows: int, cols: int, tokens: int, ff: float, bf16: bool, reps: int) -> dict[str, Any]:
    import torch

    import ffid
    from ffid.engine import paths

    dev = kit.device()
    torch.manual_seed(0)
    wdtype = torch.bfloat16 if bf16 else torch.float32
    net = torch.nn.Sequential(torch.nn.Linear(cols, rows)).to(dev, wdtype)
    x = torch.randn(tokens, cols, device=dev, dtype=wdtype, requires_grad=True)
    sel = ffid.plan(net, ff, 1, "spread")
    k = sel["0.weight"].count
    net.requires_grad_(False)
    frozen = backward_time(net, x, bf16, reps)
    compute = torch.bfloat16 if bf16 else torch.float32
    out: dict[str, Any] = {
        "rows": rows,
        "cols": cols,
        "tokens": tokens,
        "ff": ff,
        "selected": k,
        "dtype": "bf16 autocast" if bf16 else "fp32",
        "rule": paths.auto_path(rows, cols, k, compute, dev.type),
        "frozen_backward_ms": round(frozen * 1e3, 3),
        "path_ms": {},
    }
    for path in paths.PATHS:
        handle = ffid.attach(net, sel, grad_path=path)
        try:
            t = backward_time(net, x, bf16, reps)
            ran = handle.grad_paths().get("0.weight")
        finally:
            handle.detach()
        out["path_ms"][path] = round((t - frozen) * 1e3, 3)
        if ran != path:
            out.setdefault("notes", []).append(f"forced {path} ran {ran}")
        kit.free_memory()
    fastest = min(out["path_ms"], key=out["path_ms"].get)
    out["fastest"] = fastest
    best = max(out["path_ms"][fastest], 1e-6)
    out["rule_vs_fastest"] = round(max(out["path_ms"][out["rule"]], 1e-6) / best, 3)
    return out


def main() -> None:
    args = kit.arguments(__doc__)
    part = kit.Part("paths", args.work, args.dry_run, args.budget)
    layers, ffs, reps = LAYERS, FFS, 3
    if args.dry_run:
        layers = [(n, max(8, r // 80), max(8, c // 80), max(1, t // 512)) for n, r, c, t in LAYERS[:3]]
        ffs, reps = (0.01,), 1
    for bf16 in (True, False):
        for ff in ffs:
            for name, rows, cols, tokens in layers:
                part.case(
                    f"{name} {rows}x{cols} {'bf16' if bf16 else 'fp32'} ff{ff:g}",
                    lambda r=rows, c=cols, t=tokens, f=ff, b=bf16: one_case(r, c, t, f, b, reps),
                )
    ok = [c for c in part.data["cases"] if c["status"] == "ok"]
    part.finish(
        rule_was_fastest=sum(c["rule"] == c["fastest"] for c in ok),
        cases_timed=len(ok),
        worst_rule_vs_fastest=max((c["rule_vs_fastest"] for c in ok), default=None),
    )


if __name__ == "__main__":
    kit.main_guard(main)
