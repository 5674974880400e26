"""``python -m ffid.demo.ship_base``: pretrain a demo base exactly as ``ffid demo`` does and write
it, with its info, into the package's ``bases/`` (see :mod:`ffid.demo.shipped`, which reads and
checks it). Its own module, above :mod:`.pretrain` and :mod:`.run`, which import the reading side."""

from __future__ import annotations

import json
from pathlib import Path

from .shipped import QUALITY_SAMPLES, REGENERATE, judged_quality, sha256_of, shipped_paths


def cpu_kind() -> str:
    """The CPU's vendor and the vector instructions torch dispatches to, e.g. ``AuthenticAMD
    AVX2``: float sums (MKL, oneDNN, torch's own kernels) round alike within one kind, not across
    kinds, so a base pretrained again reproduces its bits only on the kind that made it."""
    import platform

    import torch

    vendor = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return f"{vendor or platform.processor() or platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def regenerate(width: int = 64, held_out: tuple[int, ...] = (), bases_dir: Path | None = None) -> Path:
    """Pretrain the default demo's base exactly as ``ffid demo`` does and write it with its info
    into ``bases_dir``; returns the file. ``width`` and ``held_out`` (digits, as ``ffid demo
    --characters`` holds them out) give another seed-0 base, e.g. the width-128 one of
    ``bench/stack.py --width 128`` (``width=128, held_out=(7, 4, 1, 9)``). Run from a git checkout
    so the info records the commit."""
    import platform
    import subprocess
    import tempfile
    import time

    import diffusers
    import torch

    from .._version import __version__
    from ..train.io import atomic_write_bytes
    from .classifier import fit_judge
    from .config import DemoConfig, spec_of_width
    from .data import load_digit_images
    from .pretrain import load_or_pretrain
    from .run import set_determinism
    from .task import load_model

    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.rstrip()  # the code that runs: recorded before it runs
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DemoConfig(output_dir=tmp, cache_dir=tmp, fresh=True, progress=False)
        if width != cfg.spec.dim:
            cfg.spec = spec_of_width(width)
        if held_out:
            cfg.characters = tuple(held_out)
        cfg.validate()
        set_determinism(cfg.seed, cfg.threads)  # as run_demo does before anything else
        data = load_digit_images(cfg.spec.image_size)
        made = time.strftime("%Y-%m-%d")
        path, _, _ = load_or_pretrain(cfg, data, print)
        info = json.loads(path.with_suffix(".json").read_text())
        judge = fit_judge(*data, seed=cfg.seed, calibrate=True)
        model, _ = load_model(path)
        quality = judged_quality(model, cfg, judge, QUALITY_SAMPLES)
        target, info_target = shipped_paths(info["key"], bases_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, path.read_bytes())
    info |= {
        "sha256": sha256_of(target),
        "bytes": target.stat().st_size,
        "made": made,
        "command": REGENERATE
        + (f" --width {width}" if width != 64 else "")
        + (f" --held_out {' '.join(map(str, held_out))}" if held_out else ""),
        "ffid_commit": commit,
        # tracked files that differed from that commit when the base was made (none: a clean tree)
        "uncommitted": [line[3:] for line in dirty.splitlines()],
        "ffid_version": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_kind(),
        "quality": quality,
    }
    atomic_write_bytes(info_target, (json.dumps(info, indent=1) + "\n").encode())
    print(f"wrote {target} ({info['bytes']:,} bytes) and {info_target.name}")
    return target


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog=REGENERATE, description="pretrain and write the demo base shipped with ffid (seed 0 recipe)"
    )
    p.add_argument("--width", type=int, default=64, help="model width (64: the default demo's base)")
    p.add_argument("--bases_dir", default=None, help="where to write (default: the package's bases/)")
    p.add_argument(
        "--held_out",
        type=int,
        nargs="*",
        default=[],
        help="digits kept out of pretraining, as ffid demo --characters keeps them (default: 7 and 4)",
    )
    args = p.parse_args(argv)
    regenerate(args.width, tuple(args.held_out), Path(args.bases_dir) if args.bases_dir else None)


if __name__ == "__main__":
    main()
