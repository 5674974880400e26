"""Memory and step time of the ffid engine on a Wan-architecture model, against its floor and full finetuning.

Run: ``python bench/engine.py`` (defaults: dim 1024, 8 blocks, 1024 tokens, fp32 on CPU), or
smaller for a quick look: ``python bench/engine.py --dim 512 --layers 4 --frames 2``.

Every variant runs in a fresh subprocess (same model, same seed, same batch) so that its peak
memory is its own:

- ``floor``: frozen model, backprop to the input only (what training *nothing* costs);
- ``full``: full finetuning with torch AdamW;
- ``spread@ff`` / ``compat-v2@ff``: ffid with torch AdamW on the proxies.

Memory is the process's peak resident set during the training steps (``VmHWM`` from
``/proc/self/status``, reset through ``/proc/self/clear_refs`` after a warm-up step) minus the
resident set before the model was built (interpreter and libraries): model weights + activations +
gradients + optimizer state, as GPU memory would count them. ``MALLOC_MMAP_THRESHOLD_`` is lowered
in the subprocesses so that freed tensors leave the RSS at once. On CUDA,
``torch.cuda.max_memory_allocated`` is used instead. Step time is the median over ``--steps``
steps after the warm-up step, measured as process CPU time with one torch thread on CPU (the
machine this was written on is shared, so wall time measured the neighbours), wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TARGET_MEM_SLACK = 0.10  # ffid spread ff 0.01: peak <= floor + 16 B x selected + 10 % of floor
TARGET_TIME = 1.25  # ... and step time <= 1.25 x floor


def _rss_peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    heads = max(1, args.dim // 128)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=args.dim // heads,
        in_channels=16,
        out_channels=16,
        text_dim=args.text_dim,
        freq_dim=256,
        ffn_dim=args.ffn or 4 * args.dim,
        num_layers=args.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    return model


def batch(args: argparse.Namespace, device: str):  # type: ignore[no-untyped-def]
    import torch

    g = torch.Generator().manual_seed(1)
    side = args.side
    x = torch.randn(1, 16, args.frames, side, side, generator=g)
    return {
        "hidden_states": x.to(device),
        "timestep": torch.tensor([500]).to(device),
        "encoder_hidden_states": torch.randn(1, args.text_len, args.text_dim, generator=g).to(device),
        "target": torch.randn(1, 16, args.frames, side, side, generator=g).to(device),
    }


def run_variant(args: argparse.Namespace) -> dict:
    """One variant, in this process; returns the measurements."""
    import torch

    import ffid

    torch.set_num_threads(args.threads)
    device = args.device
    cuda = device.startswith("cuda")
    import diffusers.models.transformers.transformer_wan  # noqa: F401  (library code is not training memory)

    runtime = 0 if cuda else _status_kb("VmRSS") * 1024  # interpreter + libraries, not ours
    model = build(args).to(device)
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    data = batch(args, device)
    target = data.pop("target")
    variant = args.variant
    selected = 0
    opt = None
    if variant == "floor":
        model.requires_grad_(False)
        data["hidden_states"].requires_grad_(True)
    elif variant == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    else:
        selector, ff = variant.split("@")
        handle = ffid.attach(model, ff=float(ff), ffid=1, selector=selector)
        selected = handle.selection.selected
        opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=1e-5))

    def step() -> float:
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
            out = model(**data, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            data["hidden_states"].grad = None
        return float(loss)

    params = sum(p.numel() for p in model.parameters())
    step()  # warm-up (also allocates the optimizer state, which counts as training memory)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024 - runtime
        _rss_peak_reset()
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024 - runtime
    return {
        "variant": variant,
        "params": params,
        "selected": selected,
        "peak": peak,
        "base": base,
        "wall": statistics.median(times),
        # On a shared CPU, wall time measures the neighbours; CPU time of the process measures the work.
        "step": statistics.median(times) if cuda else statistics.median(cpu),
        "clock": "wall time" if cuda else "process CPU time",
        "memory": "cuda max_memory_allocated"
        if cuda
        else "peak RSS (VmHWM) minus the RSS before the model was built",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=0, help="FFN width (default 4 x dim)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--frames", type=int, default=4, help="latent frames; tokens = frames x (side/2)^2")
    p.add_argument("--side", type=int, default=32, help="latent height = width")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ff", type=float, nargs="+", default=[0.01, 0.001])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast bf16")
    p.add_argument("--checkpointing", action="store_true", help="diffusers enable_gradient_checkpointing()")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work, no spin-waits)")
    p.add_argument(
        "--only", nargs="*", help="variants to run (floor, full, spread@0.01, compat-v2@0.001, ...)"
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    tokens = args.frames * (args.side // 2) ** 2
    variants = ["floor", "full"] + [f"{s}@{ff}" for s in ("spread", "compat-v2") for ff in args.ff]
    if args.only:
        variants = [v for v in variants if v in args.only]
    print(
        f"Wan-architecture (diffusers WanTransformer3DModel) dim {args.dim}, ffn {args.ffn or 4 * args.dim}, "
        f"{args.layers} blocks, {tokens} tokens, {'bf16 autocast' if args.bf16 else 'fp32'} "
        f"on {args.device}, "
        f"{args.threads} threads, median of {args.steps} steps"
        + (", gradient checkpointing" if args.checkpointing else ""),
        flush=True,
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    results: dict[str, dict] = {}
    for v in variants:
        cmd = [sys.executable, os.path.abspath(__file__), *_forward_args(args), "--variant", v]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(f"{v}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[v] = json.loads(lines[-1])
        r = results[v]
        print(
            f"  ran {v:<16} peak {r['peak'] / 2**20:8.1f} MiB  step {r['step']:7.3f} s "
            f"({r['clock']}; wall {r['wall']:.3f} s)",
            flush=True,
        )
    if "floor" not in results:
        return 1
    report(results)
    return 0


def _forward_args(args: argparse.Namespace) -> list[str]:
    """The options of this run, for the per-variant subprocesses."""
    out = []
    keys = ("dim", "ffn", "layers", "text_dim", "text_len", "frames", "side", "steps", "device", "threads")
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out += ["--ff", *map(str, args.ff)]
    out += ["--bf16"] * args.bf16 + ["--checkpointing"] * args.checkpointing
    return out


def report(results: dict[str, dict]) -> None:
    floor = results["floor"]
    full = results.get("full")
    print(f"\nmemory: {floor['memory']} (so it includes the weights); step: median {floor['clock']}")
    print(
        f"model {floor['params']:,} parameters ({floor['params'] * 4 / 2**20:.0f} MiB in fp32); "
        "'over floor' = peak - floor peak"
    )
    print(
        f"{'variant':<18}{'selected':>12}{'peak MiB':>10}{'x floor':>9}{'over floor MiB':>16}"
        f"{'step s':>9}{'x floor':>9}"
    )
    for v, r in results.items():
        print(
            f"{v:<18}{r['selected']:>12,}{r['peak'] / 2**20:>10.1f}{r['peak'] / floor['peak']:>9.2f}"
            f"{(r['peak'] - floor['peak']) / 2**20:>16.1f}{r['step']:>9.3f}{r['step'] / floor['step']:>9.2f}"
        )
    print()
    for v, r in results.items():
        if not v.startswith("spread@0.01"):
            continue
        mem_budget = floor["peak"] + 16 * r["selected"] + TARGET_MEM_SLACK * floor["peak"]
        time_budget = TARGET_TIME * floor["step"]
        checks = [
            ("memory <= floor + 16 B x selected + 10%", r["peak"], mem_budget, "MiB", 2**20),
            ("step time <= 1.25 x floor", r["step"], time_budget, "s", 1.0),
        ]
        if full:
            checks += [
                ("memory below full finetuning", r["peak"], full["peak"], "MiB", 2**20),
                ("step time below full finetuning", r["step"], full["step"], "s", 1.0),
            ]
        for what, got, limit, unit, scale in checks:
            verdict = "PASS" if got <= limit else "MISS"
            margin = (limit - got) / limit
            print(
                f"{verdict} {v} {what}: {got / scale:.3f} vs {limit / scale:.3f} {unit} "
                f"({'margin' if got <= limit else 'over by'} {abs(margin):.1%})"
            )


if __name__ == "__main__":
    sys.exit(main())
