#!/usr/bin/env python
"""ffid against what users would pick instead, measured side by side in one run.

Methods (same model, data, steps, seed and optimizer settings for all):

- ``floor``: every weight frozen, forward + backward to the input only (what any method pays);
- ``full``: full finetuning with AdamW;
- ``original``: the seed implementation's approach: ``compat-v2`` picks whole tensors, which are
  trained whole as ordinary parameters in the model dtype (``requires_grad`` on them only);
- ``ffid@FF``: ``ffid.attach(model, ff=FF, ffid=1)`` (selector ``spread``), for FF in 0.001 / 0.01 / 0.05;
- ``lora``: PEFT LoRA on every attention/FFN Linear of the blocks, rank matched to ffid's k at 0.01;
- ``shira``: PEFT SHiRA (sparse high-rank adapter) on the same layers, ``r`` matched the same way.

The task is the demo's: a Wan-architecture DiT (diffusers' WanTransformer3DModel) trained with
rectified flow on scikit-learn's digits. A base model is pretrained on the digits (cached), and
every method then finetunes it on the *mirrored* digits; the loss reported is the flow-matching
loss on fixed held-out noise/time draws of that task after the N steps.

Every method runs in a fresh subprocess, so that its peak memory is its own: CPU peak resident
set size (Linux VmHWM reset after the model and data are loaded; "above model" is what setup and
training add on top), or CUDA ``max_memory_allocated`` on a GPU.

    python bench/compare.py                          # the CPU comparison (a few minutes)
    python bench/compare.py --quick                  # CI smoke: tiny model, few steps
    python bench/compare.py --device cuda --dtype bf16   # a GPU, bigger model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from compare_methods import FFS, MATCH_FF, Job, adapter_rank, ffid_count  # noqa: E402
from compare_report import plot, report  # noqa: E402
from compare_run import lr_grid, measure, pretrain_base, worker_main  # noqa: E402


def quiet() -> None:
    """Silence library chatter that would drown the tables (nothing here is about correctness)."""
    import warnings

    from diffusers.utils import logging as dlog

    # "modules that should be kept in float32": we cast the whole DiT on purpose, for every method alike.
    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # peft SHiRA's sparse COO delta


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, a few steps, no pretraining")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="model dtype (fp32 on CPU, bf16 on CUDA)",
    )
    ap.add_argument("--size", default=None, help="model size for the comparison (tiny, s, m, l, xl)")
    ap.add_argument(
        "--sweep", default=None, help="comma-separated sizes for the model-size table ('' to skip)"
    )
    ap.add_argument(
        "--image-size", type=int, default=None, help="digit images are upscaled to SxS (tokens = (S/2)^2)"
    )
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps (they do train)")
    ap.add_argument("--sweep-steps", type=int, default=None)
    ap.add_argument(
        "--lr", type=float, default=1e-3, help="AdamW learning rate of every method (no weight decay)"
    )
    ap.add_argument(
        "--lr-grid",
        default=None,
        help="comma-separated extra learning rates: every method is trained again at each one and "
        "the loss table takes each method's best ('' to skip)",
    )
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--eval-batches", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default 1 on CPU: steady timings on a shared machine; 0 = torch's default)",
    )
    ap.add_argument("--methods", default=None, help="comma-separated labels to run (default: all)")
    ap.add_argument("--out", default=None, help="folder for results .json/.md/.png (default bench/results)")
    ap.add_argument(
        "--cache", default=None, help="folder for the pretrained base (default ~/.cache/ffid/bench)"
    )
    ap.add_argument("--mem-steps", type=int, default=None, help="training steps of each memory probe")
    ap.add_argument(
        "--checkpointing",
        action="store_true",
        help="gradient checkpointing of the DiT blocks for every method (trades time for activation memory)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="probe memory in this process instead of a fresh one per method (faster, less exact)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    defaults = {
        # quick / cpu / gpu
        "dtype": ("fp32", "fp32", "bf16"),
        "size": ("tiny", "s", "xl"),
        "sweep": ("", "tiny,s,m", "s,m,l,xl"),
        "image_size": (8, 8, 32),
        "batch": (4, 64, 32),
        "steps": (3, 40, 40),
        "warmup": (1, 5, 5),
        "sweep_steps": (2, 10, 20),
        "pretrain_steps": (0, 300, 400),
        "eval_batches": (1, 8, 8),
        "mem_steps": (2, 3, 3),
        "threads": (1, 1, 0),
        "lr_grid": ("", "3e-4,3e-3,1e-2,3e-2", "3e-4,3e-3,1e-2,3e-2"),
    }
    col = 0 if args.quick else (2 if gpu else 1)
    if args.quick:
        args.in_process = True  # a fresh process per method costs more than the whole smoke run
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v[col])
    return args


def _floor_job(
    args: argparse.Namespace, size: str, steps: int, warmup: int, base: str | None, eval_batches: int
) -> Job:
    """The floor job of one comparison; the other methods are ``replace``d copies of it."""
    return Job(
        method="floor",
        label="floor",
        size=size,
        image_size=args.image_size,
        batch=args.batch,
        steps=steps,
        warmup=warmup,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        base=base,
        eval_batches=eval_batches,
        checkpointing=args.checkpointing,
    )


def build_jobs(args: argparse.Namespace, base: str | None) -> tuple[list[Job], int, int]:
    k = ffid_count(args.size, args.image_size, MATCH_FF)
    rank, _, _ = adapter_rank(args.size, args.image_size, k)
    common = _floor_job(args, args.size, args.steps, args.warmup, base, args.eval_batches)
    jobs = [
        common,
        replace(common, method="full", label="full"),
        replace(common, method="original", label="original", ff=MATCH_FF),
        *[replace(common, method="ffid", label=f"ffid@{ff:g}", ff=ff) for ff in FFS],
        replace(common, method="lora", label="lora", rank=rank),
        replace(common, method="shira", label="shira", rank=rank),
    ]
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        jobs = [j for j in jobs if j.label in keep or j.method in keep]
    return jobs, k, rank


def sweep_jobs(args: argparse.Namespace) -> list[Job]:
    jobs = []
    for size in [s.strip() for s in args.sweep.split(",") if s.strip()]:
        if size == args.size:
            continue  # measured by the main comparison
        k = ffid_count(size, args.image_size, MATCH_FF)
        rank, _, _ = adapter_rank(size, args.image_size, k)
        common = _floor_job(args, size, args.sweep_steps, max(1, args.warmup // 2), None, 0)
        jobs += [
            common,
            replace(common, method="ffid", label=f"ffid@{MATCH_FF:g}", ff=MATCH_FF),
            replace(common, method="lora", label="lora", rank=rank),
        ]
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.worker:
        return worker_main(args.worker)
    args.failures = []
    start = time.perf_counter()
    command = (
        "python bench/compare.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    cache = Path(args.cache or os.path.join(os.path.expanduser("~"), ".cache", "ffid", "bench"))
    out = Path(args.out or HERE / "results")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base = pretrain_base(args, cache)
    jobs, k, rank = build_jobs(args, base)
    print(
        f"comparison: size {args.size}, ffid k at ff {MATCH_FF:g} = {k:,}, LoRA rank / SHiRA r = {rank}",
        flush=True,
    )
    results = measure(jobs, args, f"size {args.size}")
    if not results:
        print("no method could be measured: " + "; ".join(args.failures), file=sys.stderr)
        return 1
    args.lrs = lr_grid(jobs, results, args)
    sweep: list[dict[str, Any]] = []
    by_size: dict[str, list[Job]] = {}
    for job in sweep_jobs(args):
        by_size.setdefault(job.size, []).append(job)
    for size, size_jobs in by_size.items():
        sweep += measure(size_jobs, args, f"size {size}")
    for r in results + sweep:
        r["device_name"] = _device_name(args.device)
    text, checks = report(args, results, sweep, k, rank, time.perf_counter() - start, command)
    print()
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    stem = "compare-quick" if args.quick else f"compare-{args.device.split(':')[0]}"
    (out / f"{stem}.md").write_text(text + "\n")
    payload = {
        "args": vars(args),
        "k": k,
        "rank": rank,
        "results": results,
        "sweep": sweep,
        "checks": [asdict(c) for c in checks],
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    written = [f"{stem}.md", f"{stem}.json"]
    main_sweep = [r for r in results if r["label"] in ("floor", f"ffid@{MATCH_FF:g}", "lora")]
    if any(r["label"] == "floor" for r in results) and plot(results, sweep + main_sweep, out / f"{stem}.png"):
        written.append(f"{stem}.png")
    print(f"\nwrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
