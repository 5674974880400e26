"""Size of a delta with implicit indices (format 2) against explicit ones, and the cost of rebuilding.

Plans ``--ff`` (default 0.01, spread, id 1) on a preset's shapes (default ``wan2.2-t2v-14b``, the
shapes of Wan 2.2 14B low noise), writes a real format 2 delta with ffid's writer (random bf16
values: sizes do not depend on them), and reports:

- bytes of the written file per stored element, against format 1 (explicit indices) with F32 and
  with BF16 values (exact sizes from :func:`ffid.checkpoint.delta_file_size`, which a test pins to
  the written file's size);
- the wall time to rebuild every index from the preset's shapes as a merge does (plan, check
  counts and fingerprint, then each tensor's indices one at a time), and the peak RSS growth
  while doing it (VmHWM after a reset, Linux), against the bytes of the int64 indices produced,
  in a fresh child process.

``--fraction F`` rebuilds only the first F of the tensors (by name) and scales the time, for
machines where the whole rebuild takes too long; the report says so.

``--merge-layers L`` also times ``ffid merge`` (child processes, peak RSS from ``/usr/bin/time``)
of a bf16 base with the Wan 2.1 1.3B layout cut to L blocks (``bench/merge.py``'s builder) with
the explicit and the implicit delta of the same ff 0.01 run, alternately, three times each, and
checks that the two merged files are identical.

    python bench/delta_size.py                    # Wan 2.2 14B, ff 0.01
    python bench/delta_size.py --preset wan2.1-t2v-1.3b --ff 0.05
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REBUILD = r"""
import json, sys, time
from ffid.checkpoint import DeltaFile
path, preset, fraction = sys.argv[1], sys.argv[2], float(sys.argv[3])
import torch, ffid.select  # imported before the baseline: their own memory is not the rebuild's
torch.set_num_threads(2)

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
    f.write("5")
rss0 = status("VmRSS")
t0 = time.perf_counter()
with DeltaFile(path, base=preset) as df:
    t1 = time.perf_counter()
    names = df.names[: max(1, round(len(df.names) * fraction))]
    produced = 0
    for n in names:
        produced += df.read_indices_np(n).nbytes
    t2 = time.perf_counter()
print(json.dumps({"plan_s": t1 - t0, "indices_s": t2 - t1, "tensors": len(names),
                  "index_bytes": produced, "peak_rss_growth": status("VmHWM") - rss0}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan2.2-t2v-14b")
    ap.add_argument("--ff", type=float, default=0.01)
    ap.add_argument("--ffid", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of tensors whose indices are rebuilt")
    ap.add_argument("--workdir", default=None, help="folder for the delta (default: a temp folder)")
    ap.add_argument("--merge-layers", type=int, default=None, help="also time merges on this many blocks")
    args = ap.parse_args()
    if args.merge_layers:
        print(json.dumps(time_merges(args.merge_layers, args.workdir), indent=2))

    import torch

    import ffid
    from ffid.checkpoint.delta import DeltaTensor, TensorFingerprint, delta_file_size, write_delta
    from ffid.checkpoint.namemap import detect_naming

    sel = ffid.plan(args.preset, args.ff, args.ffid)
    k = sel.selected
    gen = torch.Generator().manual_seed(0)
    tensors = [
        DeltaTensor(n, tuple(p.shape), None, torch.randn(p.count, generator=gen).to(torch.bfloat16))
        for n, p in sel.items()
    ]
    fps = {n: TensorFingerprint(tuple(p.shape), "0" * 16) for n, p in sel.items()}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "implicit.safetensors"
        t0 = time.perf_counter()
        size = write_delta(
            path,
            tensors,
            selector=sel.selector,
            params=sel.params,
            selection_fingerprint=sel.fingerprint,
            base_fingerprint=fps,
            base_manifest_fingerprint=sel.manifest.fingerprint,
            naming=detect_naming(sel.manifest.names),
            total_params=sel.total_params,
            source="train",
            indices="implicit",
            selection=sel,
        )
        write_s = time.perf_counter() - t0
        del tensors
        assert size == path.stat().st_size
        child = subprocess.run(
            [sys.executable, "-c", REBUILD, str(path), args.preset, str(args.fraction)],
            capture_output=True,
            text=True,
            check=True,
        )
        rebuild = json.loads(child.stdout.strip().splitlines()[-1])
    v1_f32 = delta_file_size(sel, value_code="F32")
    v1_bf16 = delta_file_size(sel, value_code="BF16")
    scale = 1 / args.fraction
    report = {
        "preset": args.preset,
        "ff": args.ff,
        "ffid": args.ffid,
        "elements": k,
        "tensors": len(sel),
        "implicit_bf16_bytes": size,
        "implicit_bf16_bytes_per_element": size / k,
        "explicit_f32_bytes": v1_f32,
        "explicit_f32_bytes_per_element": v1_f32 / k,
        "explicit_bf16_bytes": v1_bf16,
        "explicit_bf16_bytes_per_element": v1_bf16 / k,
        "write_s": write_s,
        "rebuild_plan_s": rebuild["plan_s"],
        "rebuild_indices_s": rebuild["indices_s"],
        "rebuild_fraction": args.fraction,
        "rebuild_total_s_estimate": rebuild["plan_s"] + rebuild["indices_s"] * scale,
        "rebuild_index_bytes": rebuild["index_bytes"],
        "rebuild_peak_rss_growth": rebuild["peak_rss_growth"],
        "peak_over_index_bytes": rebuild["peak_rss_growth"] / max(1, rebuild["index_bytes"]),
        "max_rss_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(report, indent=2))
    return 0


def time_merges(layers: int, workdir: str | None) -> dict[str, object]:
    """``ffid merge`` wall time and peak RSS with an explicit and an implicit delta of one run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from merge import _FileHandle, build_base  # bench/merge.py: the same base and stand-in run

    from ffid.checkpoint import save_delta

    runs: dict[str, list[tuple[float, int]]] = {"explicit": [], "implicit": []}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = Path(tmp)
        base = d / "base.safetensors"
        size, _ = build_base(base, layers)
        handle = _FileHandle(base, 0.01, 1)
        for kind in runs:
            save_delta(handle, d / f"{kind}.safetensors", indices=kind)
        for _ in range(3):
            for kind in runs:
                cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "ffid", "merge", str(base)]
                cmd += [str(d / f"{kind}.safetensors"), "-o", str(d / f"m-{kind}.safetensors"), "-q"]
                t0 = time.perf_counter()
                child = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[kind].append((time.perf_counter() - t0, int(child.stderr.split()[-1]) * 1024))
        same = (d / "m-explicit.safetensors").read_bytes() == (d / "m-implicit.safetensors").read_bytes()
        sizes = {k: (d / f"{k}.safetensors").stat().st_size for k in runs}
    return {
        "base_bytes": size,
        "delta_bytes": sizes,
        "best_wall_s": {k: min(w for w, _ in v) for k, v in runs.items()},
        "wall_s": {k: [round(w, 2) for w, _ in v] for k, v in runs.items()},
        "peak_rss": {k: max(r for _, r in v) for k, v in runs.items()},
        "merged_identical": same,
    }


if __name__ == "__main__":
    sys.exit(main())
