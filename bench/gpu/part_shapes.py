"""Part 2: the engine at real Wan shapes: floor, full finetuning, LoRA and ffid, checkpointing off/on.

Models: Wan 2.1 14B block width (dim 5120, ffn 13824, 40 heads) with 1 and 3 blocks, and the
Wan 2.1 1.3B config whole; random bf16 weights (``bench/gpu/wan.py``), bf16 autocast, one
480x832 clip of 81 frames (32,760 tokens) and 512 text tokens. Variants:

- ``floor``: nothing trained, backward to the input (what any training costs at least);
- ``full``: every weight trained, torch AdamW on the bf16 weights (bf16 gradients and state);
- ``lora``: PEFT LoRA on every block Linear, rank matched to ffid's trainable count, AdamW;
- ``ffid``: ``ffid.attach(ff=0.01, spread)``, AdamW on the fp32 proxies (guarded).

Per case: median wall time of the timed steps and ``torch.cuda.max_memory_allocated`` over them
(weights included). The 14B-width runs at 1 and 3 blocks give a per-block slope for each figure;
``40-block`` = the 1-block figure + 39 slopes. Next to it, ``ffid estimate``'s GPU total for the
same run (the 3-block model, and the 40-block preset ``wan2.1-t2v-14b``) at this clip.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit
import wan

FF = 0.01
VARIANTS = ("floor", "full", "lora", "ffid")


def train_step(model: Any, data: dict, variant: str) -> tuple[Any, dict[str, Any]]:
    """Make ``model`` train as ``variant``; returns ``(step function, facts)``."""
    import torch

    import ffid

    facts: dict[str, Any] = {}
    opt = None
    handle = None
    if variant == "floor":
        model.requires_grad_(False)
        data["latents"].requires_grad_(True)
    elif variant == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        facts["trainable"] = sum(p.numel() for p in model.parameters())
    elif variant == "lora":
        k = ffid.plan(model, FF, 1, "spread").selected
        rank = wan.lora_rank(model, k)
        params = wan.add_lora(model, rank)
        opt = torch.optim.AdamW(params, lr=1e-5)
        facts.update(trainable=sum(p.numel() for p in params), lora_rank=rank)
    else:
        handle = ffid.attach(model, ff=FF, ffid=1)
        opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=1e-5))
        facts["trainable"] = handle.selection.selected
    target = data["target"]
    dtype = torch.bfloat16

    def step() -> None:
        with torch.autocast(data["latents"].device.type, dtype=dtype):
            out = model(data["latents"], data["t"], data["text"])
        torch.nn.functional.mse_loss(out.float(), target).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            data["latents"].grad = None

    if handle is not None:
        facts["_handle"] = handle
    return step, facts


def run_case(cfg: Any, clip: wan.Clip, variant: str, ckpt: bool, steps: int) -> dict[str, Any]:
    import torch

    dev = kit.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = wan.build(cfg, dev, dtype)
    model.checkpointing = ckpt
    model.train()
    data = wan.inputs(cfg, clip, dev, dtype)
    step, facts = train_step(model, data, variant)
    handle = facts.pop("_handle", None)
    out = {**facts, **kit.timed_steps(step, steps)}
    if handle is not None:
        counts: dict[str, int] = {}
        for path in handle.grad_paths().values():
            counts[path] = counts.get(path, 0) + 1
        out["grad_paths"] = counts
    out["params"] = sum(p.numel() for p in model.parameters())
    del model, data, step, handle
    return out


def estimate_for(model_or_preset: Any, clip_video: tuple[int, int, int] | None) -> dict[str, Any]:
    """``ffid estimate``'s GPU figures for ffid at ``FF`` (AdamW, bf16 base, no swap)."""
    from ffid.estimate import estimate

    kw: dict[str, Any] = {}
    if clip_video is not None:
        kw = {"video_size": list(clip_video[:2]), "frames": clip_video[2]}
    est = estimate(model_or_preset, FF, ffid=1, base_dtype="bf16", **kw)[0]
    return {
        "gpu_total_gib": round(est.gpu_total / kit.GIB, 3),
        "parts_gib": {k: round(v / kit.GIB, 3) for k, v in est.gpu.items()},
        "trainable": est.to_dict().get("trainable"),
    }


def extrapolate(part: kit.Part, blocks: tuple[int, int], layers: int) -> list[dict[str, Any]]:
    """Per variant and checkpointing: figure(40) = figure(b1) + (40 - b1) x per-block slope."""
    rows = []
    by = {c["case"]: c for c in part.data["cases"] if c["status"] == "ok"}
    b1, b2 = blocks
    for ckpt in (False, True):
        for v in VARIANTS:
            a, b = (
                by.get(f"14b-width-{b1}b-{v}-ckpt{int(ckpt)}"),
                by.get(f"14b-width-{b2}b-{v}-ckpt{int(ckpt)}"),
            )
            if not (a and b):
                continue
            row: dict[str, Any] = {"variant": v, "checkpointing": ckpt, "blocks": layers}
            for key in ("step_s", "peak_gib"):
                if key in a and key in b:
                    slope = (b[key] - a[key]) / (b2 - b1)
                    row[key] = round(a[key] + (layers - b1) * slope, 3)
                    row[f"{key}_per_block"] = round(slope, 4)
            rows.append(row)
    return rows


def main() -> None:
    args = kit.arguments(__doc__)
    part = kit.Part("shapes", args.work, args.dry_run, args.budget)
    if args.dry_run:
        clip, video = wan.Clip(1, 8, 8, 8), None
        width = [(b, wan.config("wan2.1-t2v-14b", b, **_toy())) for b in (1, 2)]
        small = wan.config("wan2.1-t2v-1.3b", 3, **_toy())
        steps, blocks = 1, (1, 2)
    else:
        clip, video = wan.Clip.video(480, 832, 81), (480, 832, 81)
        width = [(b, wan.config("wan2.1-t2v-14b", b)) for b in (1, 3)]
        small = wan.config("wan2.1-t2v-1.3b")
        steps, blocks = 2, (1, 3)
    part.data["clip"] = {"tokens": clip.tokens, "text_tokens": clip.text_len, "video": video}
    part.data["ff"] = FF
    # The estimates first (a second or two), so that a part killed later still has them.
    import torch

    with torch.device("meta"):
        models = {"width": wan.WanDiT(width[-1][1]), "1.3b": wan.WanDiT(small)}
    fourteen = wan.WanDiT(wan.config("wan2.1-t2v-14b", 3, **_toy())) if args.dry_run else "wan2.1-t2v-14b"
    part.data["estimates"] = {
        "width": estimate_for(models["width"].to(torch.bfloat16), video),
        "14b": estimate_for(fourteen, video),
        "1.3b": estimate_for(models["1.3b"].to(torch.bfloat16), video),
    }
    part.save()
    # The biggest runs first would be the first to be skipped when time is short; the 14B-width
    # pairs come first because the 40-block extrapolation needs both block counts.
    for ckpt in (False, True):
        for b, cfg in width:
            for v in VARIANTS:
                part.case(
                    f"14b-width-{b}b-{v}-ckpt{int(ckpt)}",
                    lambda c=cfg, v=v, k=ckpt: run_case(c, clip, v, k, steps),
                )
    for ckpt in (False, True):
        for v in VARIANTS:
            part.case(
                f"1.3b-whole-{v}-ckpt{int(ckpt)}", lambda v=v, k=ckpt: run_case(small, clip, v, k, steps)
            )
    layers = 3 if args.dry_run else 40
    part.finish(
        extrapolated=extrapolate(part, blocks, layers),
        against_estimate=against_estimate(part, blocks, layers, small.num_layers),
    )


def against_estimate(
    part: kit.Part, blocks: tuple[int, int], layers: int, small: int
) -> list[dict[str, Any]]:
    """ffid at ff 0.01 with checkpointing (what the estimate's activation term assumes): measured
    peak next to the estimate's GPU total for the same model and clip."""
    by = {c["case"]: c for c in part.data["cases"] if c["status"] == "ok"}
    ext = {(r["variant"], r["checkpointing"]): r for r in part.data.get("extrapolated") or []}
    est = part.data["estimates"]
    rows = [
        (f"14B width, {blocks[1]} blocks", by.get(f"14b-width-{blocks[1]}b-ffid-ckpt1", {}), est["width"]),
        (f"14B, {layers} blocks (extrapolated)", ext.get(("ffid", True), {}), est["14b"]),
        (f"1.3B, {small} blocks", by.get("1.3b-whole-ffid-ckpt1", {}), est["1.3b"]),
    ]
    out = []
    for run, got, e in rows:
        row: dict[str, Any] = {
            "run": run,
            "measured_peak_gib": got.get("peak_gib"),
            "estimate_gib": e.get("gpu_total_gib"),
        }
        if row["measured_peak_gib"] and row["estimate_gib"]:
            row["estimate_over_measured"] = round(row["estimate_gib"] / row["measured_peak_gib"], 3)
        out.append(row)
    return out


def _toy() -> dict[str, int]:
    t = wan.TOY
    return {
        "dim": t.dim,
        "ffn_dim": t.ffn_dim,
        "num_heads": t.num_heads,
        "text_dim": t.text_dim,
        "freq_dim": t.freq_dim,
    }


if __name__ == "__main__":
    kit.main_guard(main)
