"""Where a training variant's bytes over the frozen floor go (issue 15): an exact account.

Run: ``python bench/engine_memory.py --dim 128 --layers 2 --frames 4 --side 32 --bf16``
(the issue's toy configuration: tokens / width 8, bf16 autocast) with ``--checkpointing`` for the
checkpointed model; ``--variants`` picks the variants of ``bench/engine.py`` (``floor``,
``full``, ``lora@0.01``, ``spread@0.01``, ``spread-linears@0.01``: spread on LoRA's Linears only).

Each variant runs in its own process (the model, batch and variants of ``bench/engine.py``) and
is measured four ways on the step after a warm-up step:

1. **RSS**, as ``bench/engine.py`` reports it (peak ``VmHWM`` of a plain step minus the resident
   set before the model was built), and the resident set after set-up and after the warm-up;
2. **persistent tensors**, counted by enumeration: model parameters and buffers, ffid proxies and
   index tensors, LoRA weights, optimizer state, the batch;
3. **saved for backward**: after the forward the autograd graph is walked from the loss (no
   saved-tensor hooks, which would change what the engine saves) and every saved tensor's
   storage is counted once, parameters and proxies excluded, labelled by the node(s) saving it
   (the engine's ``SelectedMatmulBackward`` saves by weight); without checkpointing only
   (reading a checkpointed node's saved tensor would recompute its region);
4. **every allocation**: ``torch.profiler`` with ``profile_memory=True`` records each CPU
   allocation and free with the op and Python frames it came from; the running sum over the
   step gives the peak of live tensor bytes (on top of the persistent ones) and what is live at
   that moment, grouped by where it was allocated.

The difference between the RSS peak and the tensor peak is what is not a tensor: library code
pages first touched, Python objects, allocator slack. ``--json FILE`` writes everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from typing import Any

import engine as eng  # bench/engine.py: the model, batch and variants

MiB = 2**20


def _rss() -> int:
    return eng._status_kb("VmRSS") * 1024


def _file_backed() -> int:
    """Resident bytes mapped from files (library code and data pages), from ``smaps_rollup``."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {ln.split()[0]: int(ln.split()[1]) for ln in f if ln.split()[0].endswith(":")}
    except (OSError, ValueError, IndexError):
        return 0
    return (fields.get("Rss:", 0) - fields.get("Anonymous:", 0)) * 1024


def _storage_key(t: Any) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _module_kind(name: str) -> str:
    """A short label for a trained weight: which kind of matmul it is."""
    if name.startswith("blocks."):
        return "block " + name.split(".", 2)[2].rsplit(".", 1)[0]
    return name.rsplit(".", 1)[0]


def saved_tensors(root: Any, names: dict[int, str], exclude: set[int]) -> dict[str, int]:
    """Bytes of every storage the autograd graph below ``root`` keeps, counted once, by label.

    ``names`` maps ``id(pattern)`` to the trained weight's name (for the engine's nodes).
    """
    owners: dict[int, set[str]] = defaultdict(set)
    sizes: dict[int, int] = {}
    kinds: dict[int, str] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack += [n for n, _ in getattr(node, "next_functions", ())]
        label = type(node).__name__
        tensors = []
        if label.startswith("SelectedMatmul"):
            label = f"SelectedMatmul[{_module_kind(names.get(id(getattr(node, 'pattern', None)), '?'))}]"
            tensors = [t for t in node.saved_tensors if t is not None]
        else:
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    try:
                        v = getattr(node, attr)
                    except Exception:  # freed or not a tensor
                        continue
                    vs = v if isinstance(v, (tuple, list)) else [v]
                    tensors += [t for t in vs if hasattr(t, "untyped_storage")]
        for t in tensors:
            ptr, nbytes = _storage_key(t)
            if ptr in exclude or nbytes == 0:
                continue
            owners[ptr].add(label)
            sizes[ptr] = nbytes
            kinds[ptr] = str(t.dtype).replace("torch.", "")
    out: Counter[str] = Counter()
    for ptr, nbytes in sizes.items():
        out[" + ".join(sorted(owners[ptr])) + f" ({kinds[ptr]})"] += nbytes
    return dict(out)


def _where(event: Any) -> tuple[str, str]:
    """(phase, label) of an allocation event: forward / backward / optimizer, and where it came from."""
    from torch._C._profiler import _EventType

    ops, frames, modules = [], [], []
    backward_node = None
    p = event.parent
    while p is not None:
        kind = p.typed[0]
        if kind == _EventType.TorchOp:
            ops.append(p.name)
            if p.name.startswith("autograd::engine::evaluate_function: "):
                backward_node = p.name.split(": ", 1)[1]
        elif kind == _EventType.PyCall:
            if p.name.startswith("nn.Module: "):
                modules.append(p.name[len("nn.Module: ") :].rsplit("_", 1)[0])
            else:
                frames.append(p.name)
        p = p.parent
    joined = " ".join(frames)
    op = ops[0] if ops else "?"
    if "optimizer" in joined or "optim/" in joined:
        return "optimizer", f"optimizer {op}"
    if backward_node is not None:
        return "backward", f"{backward_node}: {op}"
    ours = [f for f in frames if "ffid/" in f]
    where = ours[0].split("ffid/", 1)[1] if ours else (frames[0].rsplit("/", 1)[-1] if frames else "?")
    mod = ">".join(reversed(modules[:2])) if modules else "-"
    return "forward", f"{mod} {where} {op}"


def allocation_peak(prof: Any) -> dict[str, Any]:
    """Peak of live bytes allocated during the profiled step (running sum) and what is live then."""
    from torch._C._profiler import _EventType

    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append(e)
        stack += e.children
    events.sort(key=lambda e: e.start_time_ns)
    live: dict[int, tuple[int, str, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str, str]] = {}
    peak_phase = ""
    freed_before = 0  # frees of tensors allocated before the step (e.g. last step's leftovers)
    for e in events:
        size, ptr = e.typed[1].alloc_size, e.typed[1].ptr
        if size > 0:
            phase, label = _where(e)
            live[ptr] = (size, phase, label)
            total += size
            if total > peak:
                peak, at_peak, peak_phase = total, dict(live), f"{phase}: {label}"
        else:
            found = live.pop(ptr, None)
            if found is None:
                freed_before += -size
                total += size
            else:
                total -= found[0]
    groups: Counter[str] = Counter()
    for size, phase, label in at_peak.values():
        groups[f"{phase} | {label}"] += size
    return {
        "peak": peak,
        "peak_at": peak_phase,
        "freed_preexisting": freed_before,
        "live_at_peak": dict(groups.most_common()),
    }


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant in this process (see the module docstring)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import ffid
    import ffid.engine  # noqa: F401  (library code is not training memory)

    with contextlib.suppress(ImportError):
        import peft  # noqa: F401  (LoRA's library, imported before the baseline like ffid's)
    import diffusers.models.transformers.transformer_wan  # noqa: F401

    torch.set_num_threads(args.threads)
    rss = {"runtime": _rss()}
    files = {"runtime": _file_backed()}
    model = eng.build(args)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    rss["model"] = _rss()
    data = eng.batch(args, "cpu")
    target = data.pop("target")
    variant = args.variant
    opt, handle, _, _ = eng.setup_variant(model, data, variant)
    rss["setup"] = _rss()

    def forward() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = model(**data, return_dict=False)[0]
        return torch.nn.functional.mse_loss(out.float(), target)

    def finish(loss: Any) -> None:
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            data["hidden_states"].grad = None

    finish(forward())  # warm-up: optimizer state, first-use allocations
    rss["warm"] = _rss()
    eng._rss_peak_reset()
    finish(forward())
    rss["peak"] = eng._status_kb("VmHWM") * 1024
    files["step"] = _file_backed()  # code pages stay resident: this is also their share of the peak

    # persistent tensors, by enumeration (unique storages)
    groups: dict[str, list[Any]] = {
        "model parameters": list(model.parameters()),
        "model buffers": list(model.buffers()),
        "batch": [*data.values(), target],
    }
    if handle is not None:
        groups["ffid proxies"] = list(handle.parameters())
        groups["ffid index tensors"] = handle.index_tensors()
    if opt is not None:
        groups["optimizer state"] = [
            v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
        ]
    seen: set[int] = set()
    persistent: dict[str, int] = {}
    for name, ts in groups.items():
        total = 0
        for t in ts:
            ptr, nbytes = _storage_key(t)
            if ptr not in seen:
                seen.add(ptr)
                total += nbytes
        persistent[name] = total

    saved: dict[str, int] = {}
    if not args.checkpointing:
        loss = forward()
        names = {}
        if handle is not None:
            names = {id(s.pattern): n for n, s in handle._slots.items()}
        saved = saved_tensors(loss.grad_fn, names, seen)
        finish(loss)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        finish(forward())
    alloc = allocation_peak(prof)
    paths: Counter[str] = Counter(handle.grad_paths().values()) if handle is not None else Counter()
    return {
        "variant": variant,
        "rss": rss,
        "file_backed": files,
        "persistent": persistent,
        "saved": saved,
        "alloc": alloc,
        "paths": dict(paths),
        "selected": handle.selection.selected if handle is not None else 0,
    }


def _mib(n: float) -> str:
    return f"{n / MiB:8.2f}"


def report(results: dict[str, dict[str, Any]], top: int) -> None:
    floor = results.get("floor")
    for v, r in results.items():
        rss = r["rss"]
        per = r["persistent"]
        peak_rss = rss["peak"] - rss["runtime"]
        tensors = sum(per.values()) + r["alloc"]["peak"]
        print(f"\n=== {v}" + (f"  gradient paths {r['paths']}" if r["paths"] else ""))
        print(
            f"RSS over runtime: model {_mib(rss['model'] - rss['runtime'])}  set-up "
            f"{_mib(rss['setup'] - rss['model'])}  warm-up {_mib(rss['warm'] - rss['setup'])}  "
            f"peak {_mib(peak_rss)} MiB"
        )
        code = r["file_backed"]["step"] - r["file_backed"]["runtime"]
        print(
            f"  of which file-backed pages (library code first touched) {_mib(code)} MiB, anonymous "
            f"{_mib(peak_rss - code)} MiB"
        )
        print(
            f"tensor peak {_mib(tensors)} MiB = persistent {_mib(sum(per.values()))} + step "
            f"{_mib(r['alloc']['peak'])} (peak during {r['alloc']['peak_at']}); "
            f"not tensors (RSS - tensors) {_mib(peak_rss - tensors)} MiB"
        )
        for k, n in per.items():
            print(f"  persistent {k:<24}{_mib(n)} MiB")
        if r["saved"]:
            print(f"  saved for backward (end of forward): {_mib(sum(r['saved'].values()))} MiB")
            base = Counter(floor["saved"]) if floor is not None and v != "floor" else Counter()
            mine = Counter(r["saved"])
            rows = sorted(set(mine) | set(base), key=lambda k: -(mine[k] - base[k]))
            for k in rows[:top]:
                if mine[k] != base[k] or v == "floor":
                    extra = f" (floor {_mib(base[k]).strip()})" if base else ""
                    print(f"    {_mib(mine[k])} MiB  {k}{extra}")
        print(f"  live at the step's allocation peak ({_mib(r['alloc']['peak']).strip()} MiB), top {top}:")
        for k, n in list(r["alloc"]["live_at_peak"].items())[:top]:
            print(f"    {_mib(n)} MiB  {k}")
    if floor is None:
        return
    print(
        "\nover the floor (MiB)            RSS peak  tensor peak  persistent  step peak  not tensors"
        "  (library code)"
    )
    f_rss = floor["rss"]["peak"] - floor["rss"]["runtime"]
    f_per = sum(floor["persistent"].values())
    f_ten = f_per + floor["alloc"]["peak"]
    f_code = floor["file_backed"]["step"] - floor["file_backed"]["runtime"]
    for v, r in results.items():
        rss = r["rss"]["peak"] - r["rss"]["runtime"]
        per = sum(r["persistent"].values())
        ten = per + r["alloc"]["peak"]
        code = r["file_backed"]["step"] - r["file_backed"]["runtime"]
        print(
            f"{v:<30}{_mib(rss - f_rss)}{_mib(ten - f_ten)}   {_mib(per - f_per)}   "
            f"{_mib(r['alloc']['peak'] - floor['alloc']['peak'])}   {_mib((rss - ten) - (f_rss - f_ten))}"
            f"    {_mib(code - f_code)}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--side", type=int, default=32)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--variants", nargs="+", default=["floor", "lora@0.01", "spread@0.01", "spread-linears@0.01"]
    )
    p.add_argument("--top", type=int, default=12, help="rows per breakdown")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_one(args)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    results = {}
    fwd = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--variants" in fwd:  # the subprocess gets one variant instead of the list
        i = fwd.index("--variants")
        j = i + 1
        while j < len(fwd) and not fwd[j].startswith("--"):
            j += 1
        fwd = fwd[:i] + fwd[j:]
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), *fwd, "--variant", v]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{v}: FAILED\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[v] = json.loads(lines[-1])
        print(f"  measured {v}", flush=True)
    print(
        f"dim {args.dim}, {args.layers} blocks, {args.frames * (args.side // 2) ** 2} tokens, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}"
        + (", gradient checkpointing" if args.checkpointing else "")
    )
    report(results, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
