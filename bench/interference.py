#!/usr/bin/env python
"""Interference: how much of character1 survives teaching character2 on top, method by method.

One run, the ``ffid demo`` story (tiny Wan DiT pretrained on scikit-learn's digits, character1 =
digit 7 and character2 = digit 4 held out of pretraining), same data, steps, seed, batch and prior
images for every method:

- ``ffid plain``: character1 into ``--ffid 1``, character2 into ``--ffid 2`` on top, its own data;
- ``ffid rehearsed``: the same, character1's real scans mixed into character2's data;
- ``ffid preserved``: the same, no character1 image, preservation loss on (teacher = base + delta1);
- ``ffid preserved compat-v2``: the preserved recipe with the ``compat-v2`` selector (whole tensors);
  it trains its own character1 with ``compat-v2`` too (selections of different selectors are not
  disjoint, so it cannot reuse the ``spread`` delta1);
- ``LoRA sequential``: PEFT LoRA (rank matched to ffid's trainable count) for character1, merged
  into the weights, a new LoRA for character2 on top, merged;
- ``full FT sequential``: every weight trained for character1, then for character2 on top.

The three ffid spread methods share one character1 delta (one 3a); LoRA and full FT have their own.
Columns: character1 retention = (acc after 3b - before) / (acc after 3a - before); character2
after 3b; mean accuracy of the base classes before / after 3a / after 3b; step time relative to
ffid plain, measured interleaved in this process (methods in rotation on the same batch); peak
memory of a few training steps in a fresh process per method, relative to ffid plain.

    python bench/interference.py                 # seed 0 (pretrains and caches its base)
    python bench/interference.py --seeds 0 1 2   # the issue's three seeds
    python bench/interference.py --quick         # CI smoke: tiny model, a few steps
    python bench/interference.py --stack 4       # N characters stacked: bench/stack.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from compare import quiet  # noqa: E402
from interference_methods import FULL_LR, LORA_LR, demo_config  # noqa: E402
from interference_report import checks, render  # noqa: E402
from interference_run import PARTS, RESULT_TAG, measure_memory, memory_probe, run_seed  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, a few steps")
    ap.add_argument("--lora-lr", type=float, default=LORA_LR)
    ap.add_argument("--full-lr", type=float, default=FULL_LR)
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds of the step timing")
    ap.add_argument("--time-steps", type=int, default=None, help="timed rounds of the step timing")
    ap.add_argument("--mem-steps", type=int, default=None, help="training steps of each memory probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help="memory probes in this process (approximate)")
    ap.add_argument("--fresh-process", action="store_true", help="--quick with fresh-process memory probes")
    ap.add_argument("--out", default=None, help="folder for the .md/.json (default bench/results)")
    ap.add_argument("--work", default=None, help="folder for deltas (default: a temporary folder)")
    ap.add_argument("--cache", default=None, help="pretrained bases (default ~/.cache/ffid/interference)")
    ap.add_argument(
        "--part",
        choices=PARTS,
        default=None,
        help="run one independent part of each seed and save it in --work (for parallel processes); "
        "a later run with the same --work and no --part reuses the saved parts",
    )
    ap.add_argument("--stem", default=None, help="file name of the results (default from the seeds)")
    ap.add_argument(
        "--stack",
        type=int,
        default=None,
        metavar="N",
        help="stack the first N of bench/stack.py's characters instead (that benchmark, same seeds)",
    )
    ap.add_argument(
        "--skip-memory", action="store_true", help="no memory probes (--combine takes another run's)"
    )
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="only the memory probes, on the character1 deltas in --work (for --memory-from)",
    )
    ap.add_argument(
        "--memory-from", default=None, help="reuse the peak-memory probes of an earlier run's .json"
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        default=None,
        help="no training: merge the .json of runs of single seeds into one report (--stem, default "
        "interference-cpu)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, quick, full in (("warmup", 1, 3), ("time_steps", 2, 15), ("mem_steps", 2, 3)):
        if getattr(args, k) is None:
            setattr(args, k, quick if args.quick else full)
    args.cache = args.cache or os.path.join(os.path.expanduser("~"), ".cache", "ffid", "interference")
    if args.stack is not None:
        from stack import ORDER

        if not 1 <= args.stack <= len(ORDER):
            ap.error(f"--stack {args.stack}: stack 1 to {len(ORDER)} characters, e.g. --stack 3")
    if args.part and not args.work:
        ap.error("--part needs --work (the folder the parts are saved in and read back from)")
    if args.quick and not args.fresh_process:
        args.in_process = True  # a fresh process per method costs more than the whole smoke run
    return args


def memory_only(args: argparse.Namespace) -> int:
    """Only the memory probes of the first seed, on the character1 deltas already in ``--work``
    (run next to the training parts; the final run takes them with ``--memory-from``)."""
    from ffid.demo.data import load_digit_images
    from ffid.demo.pretrain import load_or_pretrain

    seed = args.seeds[0]
    work = Path(args.work) / f"seed{seed}"
    cfg = demo_config(seed, args.quick, work, Path(args.cache), args.threads)
    base_path, _, _ = load_or_pretrain(cfg, load_digit_images(cfg.spec.image_size), print)
    deltas1 = {
        "spread": work / "character1" / "character1.safetensors",
        "compat-v2": work / "compat-v2" / "character1" / "character1.safetensors",
    }
    missing = [str(p) for p in deltas1.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"--memory-only needs the character1 deltas in --work; missing {missing}")
    fake = {
        "seed": seed,
        "config": {"threads": cfg.threads},
        "base": str(base_path),
        "deltas1": {k: str(v) for k, v in deltas1.items()},
    }
    memory = measure_memory(args, fake)
    out = Path(args.out or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem or f'interference-memory-seed{seed}'}.json"
    path.write_text(json.dumps({"memory": memory, "probe": fake}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def combine(args: argparse.Namespace) -> int:
    """One report from runs of different seeds (run in parallel as separate processes)."""
    runs = [json.loads(Path(p).read_text()) for p in args.combine]
    results = sorted((r for run in runs for r in run["seeds"]), key=lambda r: r["seed"])
    first = argparse.Namespace(**runs[0]["args"])
    memory = next((run["memory"] for run in runs if run["memory"]), None)
    for r in results:
        r["checks"] = checks(r, memory)
    command = " ; ".join(run["command"] for run in runs)
    elapsed = max(r["seconds"] for r in results)
    text = render(first, results, memory, command, elapsed)
    text += (
        "\nCombined from "
        + ", ".join(f"`{Path(p).name}`" for p in args.combine)
        + " (seeds run in parallel).\n"
    )
    out = Path(args.out or HERE / "results")
    stem = args.stem or "interference-cpu"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    payload = {"command": command, "args": runs[0]["args"], "memory": memory, "seeds": results}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(text)
    print(f"wrote {out / stem}.md/.json")
    return 0


def stack(args: argparse.Namespace) -> int:
    """``--stack N``: bench/stack.py on the first N of its characters, this run's shared flags."""
    import stack as bench_stack

    argv = ["--characters", *map(str, bench_stack.ORDER[: args.stack]), "--seeds", *map(str, args.seeds)]
    argv += ["--cache", args.cache, "--threads", str(args.threads)]
    argv += ["--lora-lr", str(args.lora_lr), "--full-lr", str(args.full_lr)]
    for flag in ("out", "work", "stem"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    return bench_stack.main([*argv, "--quick"] if args.quick else argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.worker:
        print(RESULT_TAG + json.dumps(memory_probe(json.loads(args.worker))), flush=True)
        return 0
    if args.stack is not None:
        return stack(args)
    if args.combine:
        return combine(args)
    if args.memory_only:
        return memory_only(args)
    start = time.perf_counter()
    command = (
        "python bench/interference.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    out = Path(args.out or HERE / "results")
    seeds = "-".join(str(s) for s in args.seeds)
    stem = args.stem or ("interference-quick" if args.quick else f"interference-cpu-seed{seeds}")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="ffid-interference-")
        args.work = tmp.name

    def log(msg: str) -> None:
        print(msg, flush=True)

    results: list[dict[str, Any]] = []
    memory: dict[str, dict[str, Any]] | None = None
    if args.memory_from:
        memory = json.loads(Path(args.memory_from).read_text())["memory"]
        log(f"peak memory: taken from {args.memory_from} (the same shapes for every seed)")
    try:
        for seed in args.seeds:
            log(f"seed {seed}: training every method")
            r = run_seed(args, seed, log)
            if args.part:
                log(f"seed {seed}: part {args.part} saved in {Path(args.work) / f'seed{seed}'}")
                continue
            if memory is None and not args.skip_memory:
                log("peak memory, a fresh process per method" + (" (in process)" if args.in_process else ""))
                memory = measure_memory(args, r)
            r["checks"] = checks(r, memory)
            results.append(r)
            # write after every seed: a run cut short keeps what finished
            text = render(args, results, memory, command, time.perf_counter() - start)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stem}.md").write_text(text)
            payload = {
                "command": command,
                "args": {k: v for k, v in vars(args).items()},
                "memory": memory,
                "seeds": results,
            }
            (out / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
            log(f"seed {seed} done in {r['seconds']:.0f} s; wrote {out / stem}.md/.json")
    finally:
        if tmp is not None:
            tmp.cleanup()
    if results:
        print()
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
