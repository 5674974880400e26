"""Benchmark ``ffid merge`` against ``cp`` of the same checkpoint, in one run, with peak memory.

Builds a bf16 checkpoint with the tensor layout of Wan 2.1 T2V 1.3B (825 tensors, 1.42B params,
2.84 GB; ``--layers`` scales it) in a temp folder, a delta of ``--ff`` (spread, id 1: every tensor
touched, so no tensor can take the byte-copy fast path), then times, alternately, ``cp BASE OUT``
and ``ffid merge BASE DELTA -o OUT`` as child processes (each started with nothing dirty in the
page cache), and prints the speed ratio (target: merge >= 50% of cp's speed), the ratio against a
durable copy (``cp`` then ``sync FILE``: merge fsyncs before it renames) and the merge's peak RSS
against the largest tensor. It also times reading every tensor through safetensors'
``safe_open`` against ffid's raw offset reads.

    python bench/merge.py                 # 2.84 GB, ff 0.01
    python bench/merge.py --layers 40     # larger (14B-like depth at 1.3B width), needs more disk
    python bench/merge.py --workdir /big/disk --repeats 3

Everything written is deleted at the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_base(path: Path, layers: int | None) -> tuple[int, int]:
    """Write the checkpoint (streaming); returns (file bytes, largest tensor bytes)."""
    from dataclasses import replace

    from ffid.checkpoint.stio import write_safetensors_stream
    from ffid.presets.wan import WAN_CONFIGS, wan_shapes

    cfg = WAN_CONFIGS["wan2.1-t2v-1.3b"]
    if layers is not None:
        cfg = replace(cfg, num_layers=layers)
    shapes = wan_shapes(cfg)
    entries = [(name, "BF16", shape) for name, shape in shapes.items()]
    gen = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        return (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)

    size = write_safetensors_stream(path, entries, produce, {"modelspec.title": "bench base"})
    largest = max(2 * torch.Size(s).numel() for s in shapes.values())
    return size, largest


class _FileHandle:
    """The engine contract, read from a file: base values from disk, trained = base + noise."""

    def __init__(self, path: Path, ff: float, ffid: int):
        from ffid import plan
        from ffid.checkpoint.stio import SafetensorsFile

        self.model = None
        self.selection = plan(str(path), ff, ffid)
        self._base = {}
        with SafetensorsFile(path) as sf:
            for name in self.selection:
                t = sf.read_tensor(sf.by_canonical[name]).reshape(-1)
                self._base[name] = t[self.selection.indices(name)].to(torch.float32)
        gen = torch.Generator().manual_seed(1)
        self._trained = {n: v + 1e-3 * torch.randn(v.shape, generator=gen) for n, v in self._base.items()}

    def base_values(self) -> dict[str, torch.Tensor]:
        return self._base

    def trained_values(self) -> dict[str, torch.Tensor]:
        return self._trained


def _hwm(pid: int) -> int:
    """The child's peak RSS so far (VmHWM, bytes); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_child(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process.

    The peak is read from /proc (VmHWM, polled every 10 ms until exit), not from rusage: a forked
    child's ru_maxrss includes the parent's pages it shared before exec.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return wall, peak


def time_readers(path: Path) -> tuple[float, float]:
    """Seconds to read every tensor via safe_open and via raw offset reads (warm page cache)."""
    from safetensors import safe_open

    from ffid.checkpoint.stio import SafetensorsFile

    t0 = time.perf_counter()
    with safe_open(str(path), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
            f.get_tensor(k).clone()  # get_tensor maps lazily; clone reads the bytes
    t_safe = time.perf_counter() - t0
    t0 = time.perf_counter()
    with SafetensorsFile(path) as sf:
        for e in sf.order:
            sf.read_tensor(e)
    return t_safe, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="folder for the temp files (default: a new folder under /tmp)")
    ap.add_argument("--ff", type=float, default=0.01)
    ap.add_argument("--layers", type=int, help="number of blocks (default 30, the real 1.3B model)")
    ap.add_argument("--repeats", type=int, default=2, help="cp/merge pairs to time (alternating)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ffid-bench-merge-", dir=args.workdir))
    try:
        base, delta, out = work / "base.safetensors", work / "delta.safetensors", work / "out.safetensors"
        t0 = time.perf_counter()
        size, largest = build_base(base, args.layers)
        print(
            f"base: {size / 1e9:.2f} GB bf16, largest tensor {largest / 2**20:.0f} MiB "
            f"(built in {time.perf_counter() - t0:.0f} s)"
        )
        from ffid.checkpoint import save_delta

        handle = _FileHandle(base, args.ff, 1)
        dsize = save_delta(handle, delta)
        sel = handle.selection
        print(
            f"delta: ff {args.ff} spread id 1, {sel.selected:,} elements in {len(sel)} of "
            f"{len(sel.manifest)} tensors, {dsize / 1e6:.1f} MB"
        )
        del handle

        t_safe, t_raw = time_readers(base)
        print(f"read all tensors (warm cache): safe_open {t_safe:.2f} s, raw offset reads {t_raw:.2f} s")

        merge_cmd = [sys.executable, "-m", "ffid", "merge", str(base), str(delta), "-o", str(out), "-q"]
        baseline_cmd = [sys.executable, "-c", "import ffid.checkpoint, ffid.cli.merge"]
        # cp leaves the copy dirty in the page cache; merge fsyncs before its rename (the
        # never-corrupt rule). The durable copy is cp followed by `sync FILE`.
        durable_cp = ["sh", "-c", f"cp '{base}' '{out}' && sync '{out}'"]
        _, rss_import = run_child(baseline_cmd)
        times: dict[str, list[float]] = {"cp": [], "cp+sync": [], "merge": []}
        rss = 0
        run_child(["cp", str(base), str(out)])  # warm the page cache for every reader
        out.unlink()
        for _ in range(args.repeats):
            for label, argv in (
                ("cp", ["cp", str(base), str(out)]),
                ("cp+sync", durable_cp),
                ("merge", merge_cmd),
            ):
                # Each run starts with nothing dirty: otherwise a run pays for the write-back
                # of the one before it (a merge after a cp was 2x slower that way).
                os.sync()
                wall, peak = run_child(argv)
                times[label].append(wall)
                if label == "merge":
                    rss = max(rss, peak)
                out.unlink()
        from ffid.checkpoint import merge_checkpoint

        lib_times = []
        for _ in range(args.repeats):
            os.sync()
            t0 = time.perf_counter()
            merge_checkpoint(base, [delta], out)
            lib_times.append(time.perf_counter() - t0)
            out.unlink()
        best = {k: min(v) for k, v in times.items()}
        lib_best = min(lib_times)
        for label, values in times.items():
            print(
                f"{label + ':':9s}"
                + ", ".join(f"{t:.2f} s" for t in values)
                + f"  -> {size / best[label] / 1e9:.2f} GB/s"
            )
        print(
            "merge_checkpoint() in-process (no interpreter start-up): "
            + ", ".join(f"{t:.2f} s" for t in lib_times)
            + f"  -> {size / lib_best / 1e9:.2f} GB/s"
        )
        print(
            f"merge speed / cp speed = {best['cp'] / best['merge']:.2f} for the `ffid merge` command, "
            f"{best['cp'] / lib_best:.2f} for the library call (best of {args.repeats}; target >= 0.50)"
        )
        print(
            "merge speed / durable cp (cp + sync) speed = "
            f"{best['cp+sync'] / best['merge']:.2f} for the command, "
            f"{best['cp+sync'] / lib_best:.2f} for the library call"
        )
        print(
            f"merge peak RSS {rss / 2**20:.0f} MiB = python+ffid import {rss_import / 2**20:.0f} MiB "
            f"+ {(rss - rss_import) / 2**20:.0f} MiB ({(rss - rss_import) / largest:.1f} x the largest "
            "tensor; "
            f"the checkpoint is {size / 2**20:.0f} MiB)"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
