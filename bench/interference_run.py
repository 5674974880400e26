"""One seed of bench/interference.py: its parts (each trained, scored and saved in --work),
the step timing of every method interleaved in one process, and the peak-memory probes.

A memory probe runs in a fresh process (``bench/interference.py --worker``) unless --in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from interference_methods import METHODS, demo_config, first_batch, make_stepper, train_dense

# A probe is the entry point itself, run with --worker: it sets up bench/ on sys.path and silences
# the libraries as every run does.
SCRIPT = Path(__file__).resolve().parent / "interference.py"
RESULT_TAG = "@@interference-result "
PARTS = (
    "base",
    "spread-3a",
    "plain",
    "rehearsed",
    "preserved",
    "compat-v2",
    "lora",
    "full",
)  # independent pieces of one seed


# ---------------------------------------------------------------------------------------------
# One seed
# ---------------------------------------------------------------------------------------------


def run_seed(args: argparse.Namespace, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from ffid.demo.characters import model_with_deltas, train_character, train_character2
    from ffid.demo.classifier import fit_judge
    from ffid.demo.data import load_digit_images
    from ffid.demo.evaluate import evaluate, prompts_for
    from ffid.demo.pretrain import load_or_pretrain
    from ffid.demo.run import set_determinism
    from ffid.demo.task import base_concepts, load_model

    t_seed = time.perf_counter()
    work = Path(args.work) / f"seed{seed}"
    cfg = demo_config(seed, args.quick, work, Path(args.cache), args.threads)
    cfg.validate()
    set_determinism(cfg.seed, cfg.threads)
    data = load_digit_images(cfg.spec.image_size)
    judge = fit_judge(*data, seed=cfg.seed)
    t0 = time.perf_counter()
    base_path, _, cached = load_or_pretrain(cfg, data, log)
    pretrain_s = time.perf_counter() - t0
    concepts = prompts_for(cfg)
    base_names = [c.name for c in base_concepts(cfg.held_out)]

    def score(model: Any) -> dict[str, float]:
        acc = evaluate("x", model, cfg, judge, concepts)[0].accuracy
        return {
            "character1": acc["character1"],
            "character2": acc["character2"],
            "base": sum(acc[n] for n in base_names) / len(base_names),
            "per_prompt": acc,
        }

    timings: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        timings[key] = round(time.perf_counter() - t, 1)
        log(f"  seed {seed}: {key} {timings[key]:.0f} s")
        return out

    lrs = {"lora": args.lora_lr, "full": args.full_lr}

    def part_base() -> dict[str, Any]:
        return {"before": timed("score base", lambda: score(model_with_deltas(base_path, [])))}

    spread_delta1 = work / "character1" / "character1.safetensors"  # where train_character writes it

    def part_spread_3a() -> dict[str, Any]:
        # ffid spread: one character1 for the three variants (a delta1 already in --work is reused:
        # the same config and seed train the same delta)
        if not spread_delta1.is_file():
            timed(
                "ffid 3a",
                lambda: train_character(cfg, "character1", cfg.character1, cfg.ffid1, base_path, [], data),
            )
        after_3a = timed("score ffid 3a", lambda: score(model_with_deltas(base_path, [spread_delta1])))
        return {"spread_3a": after_3a, "deltas1": {"spread": str(spread_delta1)}}

    def part_variant(variant: str) -> dict[str, Any]:
        # character2 on top of the spread delta1, from the same state for every variant
        if not spread_delta1.is_file():
            raise SystemExit(f"part {variant} needs {spread_delta1}: run part spread-3a first")
        d2, _, _ = timed(
            f"ffid 3b {variant}",
            lambda: train_character2(cfg, variant, base_path, spread_delta1, data),
        )
        after = timed(
            f"score ffid {variant}", lambda: score(model_with_deltas(base_path, [spread_delta1, d2]))
        )
        return {"spread_3b": {f"ffid {variant}": after}, "deltas1": {"spread": str(spread_delta1)}}

    def part_compat() -> dict[str, Any]:
        # ffid compat-v2: its own character1 (other selector), then character2 preserved
        ccfg = replace(cfg, selector="compat-v2", output_dir=str(work / "compat-v2"))
        d1, _, _ = timed(
            "compat-v2 3a",
            lambda: train_character(ccfg, "character1", cfg.character1, cfg.ffid1, base_path, [], data),
        )
        c3a = timed("score compat-v2 3a", lambda: score(model_with_deltas(base_path, [d1])))
        d2, _, _ = timed(
            "compat-v2 3b preserved",
            lambda: train_character2(ccfg, "preserved", base_path, d1, data),
        )
        c3b = timed("score compat-v2 3b", lambda: score(model_with_deltas(base_path, [d1, d2])))
        return {
            "stages": {"ffid preserved compat-v2": {"3a": c3a, "3b": c3b}},
            "deltas1": {"compat-v2": str(d1)},
        }

    def part_dense(method: str) -> dict[str, Any]:
        # LoRA / full FT, sequential: train character1, merge, train character2 on top, merge
        model, _ = load_model(base_path)
        model, _ = timed(
            f"{method} 3a",
            lambda: train_dense(
                method, cfg, model, "character1", cfg.character1, cfg.ffid1, data, lrs[method]
            ),
        )
        s3a = timed(f"score {method} 3a", lambda: score(model))
        model, _ = timed(
            f"{method} 3b",
            lambda: train_dense(
                method, cfg, model, "character2", cfg.character2, cfg.ffid2, data, lrs[method]
            ),
        )
        return {"stages": {method: {"3a": s3a, "3b": timed(f"score {method} 3b", lambda: score(model))}}}

    runners = {
        "base": part_base,
        "spread-3a": part_spread_3a,
        "plain": lambda: part_variant("plain"),
        "rehearsed": lambda: part_variant("rehearsed"),
        "preserved": lambda: part_variant("preserved"),
        "compat-v2": part_compat,
        "lora": lambda: part_dense("lora"),
        "full": lambda: part_dense("full"),
    }
    # Each part is saved as it finishes; a part already saved in --work is reused, so parts can
    # run in parallel processes (--part) and a final run without --part assembles them.
    before: dict[str, Any] = {}
    stages: dict[str, dict[str, Any]] = {}  # method -> {"3a": scores, "3b": scores}
    delta1: dict[str, Path] = {}
    spread_3a: dict[str, Any] = {}
    for name in [args.part] if args.part else PARTS:
        saved = work / f"part-{name}.json"
        if saved.is_file():
            got = json.loads(saved.read_text())
            log(f"  seed {seed}: part {name} from {saved}")
        else:
            t = time.perf_counter()
            got = runners[name]()
            got["seconds"] = round(time.perf_counter() - t, 1)
            work.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(got, indent=1) + "\n")
        timings[f"part {name}"] = got["seconds"]
        before.update(got.get("before", {}))
        stages.update(got.get("stages", {}))
        delta1.update({k: Path(v) for k, v in got.get("deltas1", {}).items()})
        spread_3a.update(got.get("spread_3a", {}))
        stages.update({m: {"3b": v} for m, v in got.get("spread_3b", {}).items()})
    if args.part:
        return {}
    for m in ("ffid plain", "ffid rehearsed", "ffid preserved"):
        stages[m]["3a"] = spread_3a  # one shared character1

    # step time, interleaved in this process on the same batch
    steppers = {m: make_stepper(m, cfg, base_path, delta1, data, lrs) for m in METHODS}
    batch = first_batch(cfg, data)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    rounds = args.warmup + args.time_steps
    t0 = time.perf_counter()
    for i in range(rounds):
        order = [METHODS[(i + s) % len(METHODS)] for s in range(len(METHODS))]
        for m in order:
            t = time.perf_counter()
            steppers[m].step(batch)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t)
    timings["step timing"] = round(time.perf_counter() - t0, 1)
    trainable = {m: sum(p.numel() for p in s.params) for m, s in steppers.items()}
    del steppers
    torch.set_num_threads(cfg.threads)

    import statistics

    step_s = {m: statistics.median(v) for m, v in times.items()}
    methods = {}
    for m in METHODS:
        a, b = stages[m]["3a"], stages[m]["3b"]
        gain = a["character1"] - before["character1"]
        kept = b["character1"] - before["character1"]
        methods[m] = {
            "character1_before": before["character1"],
            "character1_after_3a": a["character1"],
            "character1_after_3b": b["character1"],
            "retention": kept / gain if gain > 0 else None,
            "character2_before": before["character2"],
            "character2_after_3b": b["character2"],
            "base_before": before["base"],
            "base_after_3a": a["base"],
            "base_after_3b": b["base"],
            "step_s": step_s[m],
            "step_ratio": step_s[m] / step_s["ffid plain"],
            "trainable": trainable[m],
            "per_prompt_3a": a["per_prompt"],
            "per_prompt_3b": b["per_prompt"],
        }
    return {
        "seed": seed,
        "base": str(base_path),
        "base_cached": cached,
        "pretrain_s": round(pretrain_s, 1),
        "seconds": round(time.perf_counter() - t_seed, 1),
        "timings_s": timings,
        "methods": methods,
        "deltas1": {k: str(v) for k, v in delta1.items()},
        "config": {k: v for k, v in asdict(cfg).items() if k != "spec"} | {"spec": cfg.spec.to_dict()},
    }


# ---------------------------------------------------------------------------------------------
# Peak memory: a few character2 steps of each method in a fresh process
# ---------------------------------------------------------------------------------------------


def memory_probe(payload: dict[str, Any]) -> dict[str, Any]:
    import diffusers  # noqa: F401  (every probe imports the same libraries)
    import peft  # noqa: F401
    import torch
    from _common import PeakMemory

    from ffid.demo.data import load_digit_images

    torch.set_num_threads(payload["threads"])
    cfg = demo_config(
        payload["seed"], payload["quick"], Path(payload["work"]), Path(payload["cache"]), payload["threads"]
    )
    data = load_digit_images(cfg.spec.image_size)
    batch = first_batch(cfg, data)
    delta1 = {k: Path(v) for k, v in payload["deltas1"].items()}
    mem = PeakMemory("cpu")
    mem.reset()
    stepper = make_stepper(payload["method"], cfg, Path(payload["base"]), delta1, data, payload["lrs"])
    for _ in range(payload["steps"]):
        stepper.step(batch)
    peak = mem.peak()
    return {"peak_mem": peak, "base_mem": mem.base, "peak_above_base": peak - mem.base}


def spawn_probe(payload: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # RSS follows live memory (see compare_run.spawn)
    cmd = [sys.executable, str(SCRIPT), "--worker", json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
    raise RuntimeError(f"memory probe of {payload['method']} failed ({proc.returncode}):\n{tail}")


def measure_memory(args: argparse.Namespace, seed_result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cfg = seed_result["config"]
    out = {}
    for m in METHODS:
        payload = {
            "method": m,
            "seed": seed_result["seed"],
            "quick": args.quick,
            "work": str(Path(args.work) / f"seed{seed_result['seed']}"),
            "cache": args.cache,
            "threads": cfg["threads"],
            "base": seed_result["base"],
            "deltas1": seed_result["deltas1"],
            "lrs": {"lora": args.lora_lr, "full": args.full_lr},
            "steps": args.mem_steps,
        }
        out[m] = memory_probe(payload) if args.in_process else spawn_probe(payload)
        print(
            f"  memory {m}: peak {out[m]['peak_mem'] / 2**20:.1f} MiB, "
            f"+{out[m]['peak_above_base'] / 2**20:.1f} MiB above the loaded libraries",
            flush=True,
        )
    return out
