"""How bench/compare.py measures its methods: memory probes, interleaved step timing, the
pretrained base and the learning-rate grid.

Each memory probe runs one method in a fresh process (``bench/compare.py --worker``), so that its
peak is its own; the step timing runs every method in one process, interleaved step by step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

from compare_methods import Job, Runner, load_model, task_batches
from compare_report import fmt_bytes

# A worker is the entry point itself, run with --worker: it sets up bench/ on sys.path and silences
# the libraries as every run does.
SCRIPT = Path(__file__).resolve().parent / "compare.py"
RESULT_TAG = "@@bench-result "


# ---------------------------------------------------------------------------------------------
# One job = one method in one subprocess
# ---------------------------------------------------------------------------------------------


def run_job(job: Job, steps: int) -> dict[str, Any]:
    """Memory probe of one method: set up and train ``steps`` steps from a fresh model; returns the
    peak memory, optimizer-state bytes, trainable count and output size (meant for a fresh process)."""
    # Every worker imports the same modules, so the resident set of the libraries is the same
    # for every method and whole-process peaks stay comparable.
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    from _common import PeakMemory, count_params, optimizer_state_bytes

    if job.threads:
        torch.set_num_threads(job.threads)
    model = load_model(job)
    total = count_params(model)
    batches = task_batches(job)
    drawn = [batches.next() for _ in range(steps)]  # data preparation is not what is measured

    mem = PeakMemory(job.device)
    mem.reset()
    runner = Runner(job, model)  # setup is part of the peak
    for b in drawn:
        runner.step(b)
    peak = mem.peak()
    with tempfile.TemporaryDirectory() as tmp:
        out_bytes, out_kind = runner.save(tmp)
    return {
        **asdict(job),
        "total_params": total,
        "trainable": runner.trainable,
        "base_mem": mem.base,
        "peak_mem": peak,
        "peak_above_model": peak - mem.base,
        "opt_state_bytes": optimizer_state_bytes(runner.opt),
        "output_bytes": out_bytes,
        "output_kind": out_kind,
        "info": runner.info,
    }


def time_jobs(jobs: list[Job], log: bool = True) -> dict[str, dict[str, Any]]:
    """Train every job's method for warm-up + steps, interleaved step by step in this process.

    All methods see the same batches, and round ``i`` runs them in an order rotated by ``i``, so
    a slow spell of a shared machine is spread over all methods instead of hitting one of them:
    the ratios stay meaningful under load. Returns per label: median step time (warm-up
    excluded), all step times, train losses, and the eval loss after the last step.
    """
    import torch
    from _common import StepTimer

    if not jobs:
        return {}
    first = jobs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    runners = [Runner(j, load_model(j)) for j in jobs]
    timers = [StepTimer(j.device) for j in jobs]
    losses: list[list[float]] = [[] for _ in jobs]
    batches = task_batches(first)
    rounds = first.warmup + first.steps
    t0 = time.perf_counter()
    for i in range(rounds):
        batch = batches.next()
        n = len(runners)
        for j in [(i + s) % n for s in range(n)]:
            losses[j].append(timers[j](partial(runners[j].step, batch)))
        if log and (i + 1) % max(1, rounds // 5) == 0:
            print(f"  timing round {i + 1}/{rounds} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {}
    evals = task_batches(first, seed_offset=10_000)
    eval_draws = [evals.next() for _ in range(first.eval_batches)]
    for job, runner, timer, ls in zip(jobs, runners, timers, losses, strict=True):
        out[job.label] = {
            "step_s": timer.median(job.warmup),
            "step_times": timer.times,
            "train_losses": ls,
            "eval_loss": runner.eval_loss(eval_draws) if eval_draws else None,
        }
    return out


def worker_main(payload: str) -> int:
    data = json.loads(payload)
    steps = data.pop("mem_steps")
    result = run_job(Job(**data), steps)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def spawn(job: Job, steps: int) -> dict[str, Any]:
    """Run the memory probe of ``job`` in a fresh Python process and return its figures."""
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--worker",
        json.dumps({**asdict(job), "mem_steps": steps}),
    ]
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A fixed mmap threshold makes glibc map every tensor above 64 KiB on its own and unmap it when
    # freed, so the resident set follows live memory instead of heap fragmentation (without it the
    # same probe varied by ~10 MiB from run to run).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
    raise RuntimeError(
        f"worker for {job.label} ({job.size}) failed with exit code {proc.returncode}:\n{tail}"
    )


# ---------------------------------------------------------------------------------------------
# In the parent: the pretrained base, the measurements of a set of jobs, the learning-rate grid
# ---------------------------------------------------------------------------------------------


def pretrain_base(args: argparse.Namespace, cache: Path) -> str | None:
    """Pretrain (full FT, fp32) the base on the upright digits once; cached by its settings."""
    if args.pretrain_steps <= 0:
        return None
    key = (
        f"base-{args.size}-img{args.image_size}-b{args.batch}-n{args.pretrain_steps}"
        f"-lr{args.pretrain_lr:g}-s{args.seed}"
    )
    path = cache / f"{key}.safetensors"
    if path.exists():
        return str(path)
    import torch
    from _common import SIZES, FlowBatches, build_model, class_text, flow_loss, load_digits
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    print(
        f"pretraining the base ({args.size}, {args.pretrain_steps} steps on {args.device}) -> {path}",
        flush=True,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(SIZES[args.size], args.image_size, seed=args.seed).to(args.device)
    images, labels = load_digits(args.image_size, mirror=False)
    batches = FlowBatches(images, labels, class_text(), args.batch, seed=args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.pretrain_steps)
    t0 = time.perf_counter()
    for i in range(args.pretrain_steps):
        loss = flow_loss(model, batches.next(), args.device, torch.float32)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (i + 1) % max(1, args.pretrain_steps // 5) == 0:
            print(f"  step {i + 1}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return str(path)


def measure(jobs: list[Job], args: argparse.Namespace, what: str) -> list[dict[str, Any]]:
    """Memory probes (a fresh process per method unless ``--in-process``), then interleaved timing."""
    results = []
    ok = []
    for job in jobs:
        try:
            r = run_job(job, args.mem_steps) if args.in_process else spawn(job, args.mem_steps)
        except Exception as exc:  # one broken method (say, on an untested GPU) must not sink the others
            note = f"{job.label} ({job.size}) failed: {str(exc).strip().splitlines()[-1]}"
            print(f"  FAILED {note}", flush=True)
            args.failures.append(note)
            continue
        ok.append(job)
        print(
            f"  memory {job.label:>10} ({job.size}): peak {fmt_bytes(r['peak_mem'])} "
            f"(+{fmt_bytes(r['peak_above_model'])} above the model), trainable {r['trainable']:,}",
            flush=True,
        )
        results.append(r)
    if not ok:
        return results
    print(f"timing {what}: {len(ok)} methods interleaved, {ok[0].warmup}+{ok[0].steps} steps", flush=True)
    timed = time_jobs(ok)
    for r in results:
        r.update(timed[r["label"]])
        loss = "" if r["eval_loss"] is None else f", loss after N {r['eval_loss']:.4f}"
        print(f"  {r['label']:>10} ({r['size']}): {r['step_s'] * 1000:8.1f} ms/step{loss}", flush=True)
    return results


def lr_grid(jobs: list[Job], results: list[dict[str, Any]], args: argparse.Namespace) -> list[float]:
    """Train every measured method again at each extra learning rate (same data, steps and seed)
    and record its loss after N per rate, so each method can be judged at its own best rate."""
    lrs = [float(x) for x in args.lr_grid.split(",") if x.strip()]
    trained = [j for j in jobs if j.method != "floor" and j.label in {r["label"] for r in results}]
    for r in results:
        r["loss_by_lr"] = {} if r["eval_loss"] is None else {args.lr: r["eval_loss"]}
    for lr in lrs:
        print(f"learning-rate grid: lr {lr:g}, {len(trained)} methods", flush=True)
        timed = time_jobs([replace(j, lr=lr) for j in trained], log=False)
        for r in results:
            if r["label"] in timed and timed[r["label"]]["eval_loss"] is not None:
                r["loss_by_lr"][lr] = timed[r["label"]]["eval_loss"]
    for r in results:
        finite = {lr: v for lr, v in r["loss_by_lr"].items() if math.isfinite(v)}
        r["best_lr"] = min(finite, key=finite.__getitem__) if finite else None
        r["best_loss"] = finite[r["best_lr"]] if finite else None
    return sorted({args.lr, *lrs}) if lrs else []
