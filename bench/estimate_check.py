"""Check ``ffid estimate`` against what the engine really holds, on CPU.

For Wan-architecture diffusers models of two sizes (built from config, random weights), several
``ff`` values, two selectors and two optimizers, this attaches the engine, runs real training
steps, and measures, by counting the bytes of the tensors involved (tracemalloc cannot see torch
allocations, and RSS is too coarse for a few MB):

- base weights: the model's parameters;
- proxies and their gradients: ``handle.parameters()`` and their ``.grad``;
- optimizer state: distinct tensors in ``optimizer.state`` (shared ones counted once);
- indices: distinct index tensors the engine keeps (``handle.index_tensors()``: compact flat
  positions and CSR row pointers per compute device);
- workspace: the largest temporary the engine builds (effective weights, dense whole-tensor
  gradients) plus the hook-path effective copies of one forward, recorded by wrapping the
  engine functions that build them;
- delta file: the size of the file ``handle.save_delta`` writes.

Each is compared with ``ffid.estimate.estimate_selection`` for the same selection. The parts the
estimate claims to know must be within 15%; the script exits 1 otherwise. Activations are not
compared: the estimate does not claim them (they are given by the user, or a rough Wan guess).

    python bench/estimate_check.py            # markdown table on stdout
    python bench/estimate_check.py --quick    # smaller matrix (used by the tests)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

import ffid
from ffid.engine import attach
from ffid.engine import handle as engine_handle
from ffid.engine import kernels as engine_kernels
from ffid.estimate import estimate_selection

TOLERANCE = 0.15
KNOWN_PARTS = ("base", "proxies", "gradients", "optimizer", "indices", "workspace", "delta")


# -- models ---------------------------------------------------------------------------------------
def wan_model(size: str) -> torch.nn.Module:
    """A diffusers WanTransformer3DModel: ``s`` (dim 32, 2 layers) or ``m`` (dim 256, 4 layers)."""
    from diffusers import WanTransformer3DModel

    cfg = {
        "s": {"heads": 2, "head_dim": 16, "ffn": 64, "layers": 2, "text": 32},
        "m": {"heads": 4, "head_dim": 64, "ffn": 1024, "layers": 4, "text": 128},
    }[size]
    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["head_dim"],
        in_channels=4,
        out_channels=4,
        text_dim=cfg["text"],
        freq_dim=16,
        ffn_dim=cfg["ffn"],
        num_layers=cfg["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def wan_batch(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text_dim = model.config.text_dim
    return {
        "hidden_states": torch.randn(2, 4, 1, 8, 8, generator=g),
        "timestep": torch.tensor([500, 250]),
        "encoder_hidden_states": torch.randn(2, 6, text_dim, generator=g),
    }


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, relative_step=False, scale_parameter=False)
    return torch.optim.AdamW(params, lr=1e-4)


# -- measuring ------------------------------------------------------------------------------------
def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def distinct_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (views and shared tensors counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


def engine_index_tensors(handle: Any) -> list[torch.Tensor]:
    """Every index tensor the engine keeps."""
    return list(handle.index_tensors())


@contextlib.contextmanager
def record_temporaries() -> Iterator[dict[str, int]]:
    """Record the largest temporary the engine builds and the hook-path copies per forward."""
    seen = {"largest": 0, "hook_copies": 0}
    originals: list[tuple[Any, str, Any]] = []
    copied: set[int] = set()  # slots whose effective copy was counted

    def wrap(owner: Any, attr: str, kind: str) -> None:
        fn = getattr(owner, attr)
        originals.append((owner, attr, fn))

        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = fn(*args, **kwargs)
            seen["largest"] = max(seen["largest"], _bytes(out))
            # One kept copy per touched tensor: every attribute read forms the effective tensor,
            # and a module that reads it twice (diffusers' FP32LayerNorm tests
            # ``self.weight is not None`` first) drops the first copy at once.
            if kind == "hook" and torch.is_grad_enabled() and id(args[1]) not in copied:
                copied.add(id(args[1]))
                seen["hook_copies"] += _bytes(out)
            return out

        setattr(owner, attr, wrapped)

    wrap(engine_kernels, "effective_matrix", "matmul")
    wrap(engine_kernels, "sampled_grad", "matmul")
    wrap(engine_handle.FfidHandle, "_effective", "hook")
    try:
        yield seen
    finally:
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)


def measure(size: str, ff: float, selector: str, optimizer: str, steps: int = 2) -> dict[str, Any]:
    model = wan_model(size)
    sel = ffid.plan(model, ff, 0, selector)
    handle = attach(model, sel)
    opt = make_optimizer(optimizer, list(handle.parameters()))
    batch = wan_batch(model)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        out = model(**batch, return_dict=False)[0]
        out.float().pow(2).mean().backward()
        opt.step()

    with record_temporaries() as temps:
        step()  # first step creates optimizer state and device index caches
        per_forward_copies = temps["hook_copies"]
        for _ in range(steps - 1):
            step()

    est = estimate_selection(sel, optimizer=optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "d.safetensors")
        handle.save_delta(path)
        delta = os.path.getsize(path)

    params = list(handle.parameters())
    measured = {
        "base": sum(_bytes(p) for p in model.parameters()),
        "proxies": sum(_bytes(p) for p in params),
        "gradients": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": distinct_bytes(
            [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        ),
        "indices": distinct_bytes(engine_index_tensors(handle)),
        "workspace": temps["largest"] + per_forward_copies,
        "delta": delta,
    }
    estimated = {
        "base": est.gpu["base_resident"],
        "proxies": est.gpu["proxies"],
        "gradients": est.gpu["gradients"],
        "optimizer": est.gpu["optimizer"],
        "indices": est.gpu["indices"],
        "workspace": est.gpu["workspace"],
        "delta": est.delta_file_bytes,
    }
    handle.detach()
    return {
        "size": size,
        "params": est.total_params,
        "ff": ff,
        "selector": selector,
        "optimizer": optimizer,
        "trainable": est.trainable,
        "measured": measured,
        "estimated": estimated,
    }


def _ratio(est: int, meas: int) -> float:
    return est / meas if meas else (1.0 if est == 0 else float("inf"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller matrix (one size, two ff)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.quick:
        runs = [("s", ff, "spread", "adamw") for ff in (0.01, 0.05)] + [("s", 0.05, "compat-v2", "adamw8bit")]
    else:
        runs = [(size, ff, "spread", "adamw") for size in ("s", "m") for ff in (0.001, 0.01, 0.05)]
        runs += [("m", 0.01, "spread", "adamw8bit"), ("m", 0.01, "spread", "adafactor")]
        runs += [(size, 0.05, "compat-v2", "adamw") for size in ("s", "m")]
    rows = [measure(*r) for r in runs]

    print(
        "| model | ff | selector | optimizer | trainable | "
        + " | ".join(f"{p} est/meas" for p in KNOWN_PARTS)
        + " | known parts est / meas |"
    )
    print("|" + "---|" * (5 + len(KNOWN_PARTS) + 1))
    worst = 0.0
    for r in rows:
        cells = []
        for p in KNOWN_PARTS:
            ratio = _ratio(r["estimated"][p], r["measured"][p])
            worst = max(worst, abs(ratio - 1))
            cells.append(f"{r['estimated'][p]:,} / {r['measured'][p]:,} ({ratio:.3f})")
        est_known = sum(r["estimated"][p] for p in KNOWN_PARTS if p != "delta")
        meas_known = sum(r["measured"][p] for p in KNOWN_PARTS if p != "delta")
        print(
            f"| wan-{r['size']} ({r['params']:,}) | {r['ff']:g} | {r['selector']} | {r['optimizer']} | "
            f"{r['trainable']:,} | "
            + " | ".join(cells)
            + f" | {est_known:,} / {meas_known:,} ({_ratio(est_known, meas_known):.3f}) |"
        )
    ok = worst <= TOLERANCE
    print(
        f"\nlargest deviation of a known part: {worst:.1%} (limit {TOLERANCE:.0%}): {'OK' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
