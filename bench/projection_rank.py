#!/usr/bin/env python
"""How much room projection leaves, by width: the protected rank as a share of each layer's width.

A trained row keeps ``width - rank(Q)`` free directions, so the share of the width the protected
inputs span decides how much a run can still learn. This runs the feature pass of a first
character (protected: the base classes and the empty prompt, drawn by the model itself) on the
pretrained bases of ``bench/stack.py`` (cached by recipe; pretrained here when missing) at each
``--widths``, for each ``--energies``, and prints the protected rank share of the sampled (image
side) and text-side input groups.

    python bench/projection_rank.py                       # widths 64 128, energies 0.99 0.999
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

RESULTS = HERE / "results"


def measure(width: int, energy: float, seed: int, cache: str) -> dict[str, Any]:
    import stack

    from ffid.demo.data import load_digit_images
    from ffid.demo.pretrain import load_or_pretrain
    from ffid.demo.run import set_determinism
    from ffid.demo.task import DemoTask, base_concepts, load_model
    from ffid.engine import attach
    from ffid.preserve import ProjectionSettings, Projector, Protected

    args = stack.parse_args(["--seeds", str(seed), "--width", str(width), "--cache", cache])
    cfg = stack.stack_config(args, seed, Path(cache) / "work")
    set_determinism(cfg.seed, cfg.threads)
    data = load_digit_images(cfg.spec.image_size)
    base_path, _, _ = load_or_pretrain(cfg, data, lambda msg: print(msg, file=sys.stderr))
    model, spec = load_model(base_path)
    recipe = dataclasses.replace(cfg, preserve_method="projection").run_recipe(preserve=True)
    handle = attach(
        model,
        ff=recipe["ff"],
        ffid=1,
        selector=recipe["selector"],
        include=recipe["include"],
        **recipe["selector_args"],
    )
    try:
        protected = [Protected(c.prompt, "base class") for c in base_concepts(cfg.held_out)]
        protected.append(Protected("", "empty"))
        task = DemoTask([], model=model, spec=spec)
        projector = Projector(handle, task, protected, ProjectionSettings(energy))
        stats = projector.collect(model, torch.Generator().manual_seed(seed))
        groups = projector._groups
        sampled = [g.rank / g.width for g in groups if not g.exact]
        text = [g.rank / g.width for g in groups if g.exact]
        return {
            "width": width,
            "energy": energy,
            "seed": seed,
            "sampled_share_mean": sum(sampled) / len(sampled),
            "sampled_share_min": min(sampled),
            "sampled_share_max": max(sampled),
            "text_share": sum(text) / len(text) if text else None,
            "rows_without_room": stats.rows_without_room,
            "ranks": {k: list(v) for k, v in stats.ranks.items()},
        }
    finally:
        handle.detach()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--energies", type=float, nargs="+", default=[0.99, 0.999])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ffid" / "interference"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(w, e, args.seed, args.cache) for w in args.widths for e in args.energies]
    lines = [
        "| width | energy | sampled groups: protected rank / width, mean (min-max) | text side "
        "| rows with no room |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        text = f"{r['text_share']:.0%}" if r["text_share"] is not None else "-"
        lines.append(
            f"| {r['width']} | {r['energy']} | {r['sampled_share_mean']:.0%} ({r['sampled_share_min']:.0%}-"
            f"{r['sampled_share_max']:.0%}) | {text} | {r['rows_without_room']} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/projection_rank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "projection-rank.md").write_text(f"# Protected rank by width\n\n`{command.strip()}`\n\n{table}\n")
    (out / "projection-rank.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
