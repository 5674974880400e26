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
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

RESULT_TAG = "@@bench-result "
FFS = (0.001, 0.01, 0.05)
MATCH_FF = 0.01  # LoRA / SHiRA are sized to ffid's trainable count at this ff
FFID = 1
# Adapters go where LoRA users put them: every attention and FFN Linear of the DiT blocks.
ADAPTER_TARGETS = (
    r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*blocks\.\d+\.ffn\.net\.(0\.proj|2)"
)
WELL_BELOW = 0.8  # "well below" = at most 80% of the other method's step time
MEM_SLACK = 0.10
BYTES_PER_TRAINABLE = 16  # fp32 value + gradient + two AdamW moments


# ---------------------------------------------------------------------------------------------
# One job = one method in one subprocess
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything a worker needs (sent as JSON)."""

    method: str  # floor | full | original | ffid | lora | shira
    label: str
    size: str
    image_size: int
    batch: int
    steps: int  # timed steps after the warm-up
    warmup: int
    lr: float
    seed: int
    device: str
    dtype: str
    threads: int | None
    base: str | None  # pretrained base weights (safetensors) or None for the random init
    eval_batches: int
    ff: float | None = None
    rank: int | None = None
    checkpointing: bool = False  # diffusers' gradient checkpointing of the blocks, for every method
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


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


def _adapter_model(model, method: str, rank: int, seed: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if method == "lora":
        # alpha = r: the update is B @ A unscaled, so one learning rate means the same for any rank.
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=ADAPTER_TARGETS, lora_dropout=0.0)
    else:
        cfg = ShiraConfig(r=rank, target_modules=ADAPTER_TARGETS, random_seed=seed)
    return get_peft_model(model, cfg)


def quiet() -> None:
    """Silence library chatter that would drown the tables (nothing here is about correctness)."""
    import warnings

    from diffusers.utils import logging as dlog

    # "modules that should be kept in float32": we cast the whole DiT on purpose, for every method alike.
    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # peft SHiRA's sparse COO delta


def load_model(job: Job):  # type: ignore[no-untyped-def]
    """The job's model: built, base weights loaded, on its device in its dtype."""
    import torch
    from _common import SIZES, build_model
    from safetensors.torch import load_file

    torch.manual_seed(job.seed)
    model = build_model(SIZES[job.size], job.image_size, seed=job.seed)
    if job.base:
        state = load_file(job.base)
        model.load_state_dict(state)
        del state
    model = model.to(device=job.device, dtype=_torch_dtype(job.dtype))
    if job.checkpointing:
        model.enable_gradient_checkpointing()
    return model


def task_batches(job: Job, seed_offset: int = 0):  # type: ignore[no-untyped-def]
    """The finetuning task's batch stream (mirrored digits); the same for every method."""
    from _common import FlowBatches, class_text, load_digits

    images, labels = load_digits(job.image_size, mirror=True)
    return FlowBatches(images, labels, class_text(), job.batch, seed=job.seed + seed_offset)


class Runner:
    """One method set up on one model: ``step(batch)`` trains, ``save(folder)`` writes its output."""

    def __init__(self, job: Job, model: Any):
        import torch

        import ffid

        self.job, self.model = job, model
        self.dtype = _torch_dtype(job.dtype)
        self.opt: torch.optim.Optimizer | None = None
        self.handle: Any = None
        self.train_model = model
        self.trainable = 0
        self.info: dict[str, Any] = {}
        m = job.method
        if m == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
            return
        if m == "full":
            params = list(model.parameters())
        elif m == "original":
            sel = ffid.plan(model, job.ff, FFID, "compat-v2")
            for name, p in model.named_parameters():
                p.requires_grad_(name in sel)
            params = [p for p in model.parameters() if p.requires_grad]
            self.info["tensors"] = len(sel)
        elif m == "ffid":
            self.handle = ffid.attach(model, ff=job.ff, ffid=FFID, selector="spread")
            params = list(self.handle.parameters())
            self.info["tensors"] = len(self.handle.selection)
            self.info["routes"] = self.handle.routes()
        elif m in ("lora", "shira"):
            for p in model.parameters():
                p.requires_grad_(False)
            self.train_model = _adapter_model(model, m, job.rank or 1, job.seed)
            params = [p for p in self.train_model.parameters() if p.requires_grad]
        else:
            raise ValueError(f"unknown method {m!r}")
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
        if self.handle is not None:
            self.opt = self.handle.guard(self.opt)  # as the trainer uses it: NaN check per step
        self.train_model.train()

    def step(self, batch: Any) -> float:
        from _common import flow_loss

        loss = flow_loss(
            self.train_model, batch, self.job.device, self.dtype, input_grad=self.job.method == "floor"
        )
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def eval_loss(self, batches: list[Any]) -> float:
        import torch
        from _common import flow_loss

        self.train_model.eval()
        with torch.no_grad():
            vals = [float(flow_loss(self.train_model, b, self.job.device, self.dtype)) for b in batches]
        self.train_model.train()
        return sum(vals) / len(vals)

    def save(self, folder: str) -> tuple[int | None, str]:
        """Write what a user keeps after training; returns (bytes, what it is)."""
        from _common import file_size
        from safetensors.torch import save_file

        m = self.job.method
        if m == "ffid":
            path = os.path.join(folder, "delta.safetensors")
            self.handle.save_delta(path)
            return file_size([path]), "delta (save_delta)"
        if m in ("full", "original"):
            # The original synced its proxies back and saved the whole model, as full FT does.
            path = os.path.join(folder, "model.safetensors")
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, path)
            return file_size([path]), "full model"
        if m in ("lora", "shira"):
            self.train_model.save_pretrained(folder)
            return file_size([folder]), "adapter (save_pretrained)"
        return None, "-"


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
        str(Path(__file__).resolve()),
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
# Preparation in the parent: the pretrained base, matched adapter ranks
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


def adapter_rank(size: str, image_size: int, k: int) -> tuple[int, int, int]:
    """LoRA rank (= SHiRA r) whose trainable count is closest to ``k``; also the count per unit rank
    and the model's parameter count. Both methods have ``r * (in + out)`` parameters per Linear."""
    import re

    import torch
    from _common import SIZES, build_model, count_params

    with torch.device("meta"):
        model = build_model(SIZES[size], image_size)
    per_rank = 0
    cap = None
    pattern = re.compile(ADAPTER_TARGETS)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and pattern.fullmatch(name):
            per_rank += mod.in_features + mod.out_features
            # SHiRA cannot pick more entries than the weight has.
            lim = (mod.in_features * mod.out_features) // (mod.in_features + mod.out_features)
            cap = lim if cap is None else min(cap, lim)
    rank = max(1, round(k / per_rank))
    return min(rank, cap or rank), per_rank, count_params(model)


def ffid_count(size: str, image_size: int, ff: float) -> int:
    import torch
    from _common import SIZES, build_model

    import ffid

    with torch.device("meta"):
        model = build_model(SIZES[size], image_size)
    return ffid.plan(model, ff, FFID, "spread").selected


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


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
