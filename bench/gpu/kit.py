"""Shared pieces of the GPU kit: the machine record, atomic result files, one training step timed.

Every part (``bench/gpu/part_*.py``) writes ``<work>/part-<name>.json`` after every case, so a
part killed by its time limit still leaves what it measured; ``report.py`` merges the parts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

GIB = 2**30


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=1, default=str))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically: a temporary file in the same folder, fsync, rename, so a part
    killed mid-write leaves the previous complete file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the report is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def machine() -> dict[str, Any]:
    """Card, driver, CUDA and torch versions: recorded with every number."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["card"] = props.name
        info["card_memory_gib"] = round(props.total_memory / GIB, 1)
        info["capability"] = f"{props.major}.{props.minor}"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["card"] = "none (CPU)"
        info["driver"] = None
    return info


class Part:
    """One part's results: ``cases`` appended one at a time and saved after each."""

    def __init__(self, name: str, work: Path, dry_run: bool, budget_s: float) -> None:
        self.name = name
        self.path = Path(work) / f"part-{name}.json"
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {
            "part": name,
            "dry_run": dry_run,
            "status": "running",
            "machine": machine(),
            "cases": [],
            "notes": [],
        }
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        write_json(self.path, self.data)

    def over_budget(self) -> bool:
        """The part's own time budget is spent: later cases are skipped (recorded as such), so
        that the run's other parts still get their time."""
        return time.monotonic() - self.start > self.budget_s

    def case(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one case; a failure (an OOM included) is recorded and the part goes on."""
        if self.over_budget():
            row = {"case": name, "status": "skipped", "why": f"part budget {self.budget_s:.0f} s spent"}
        else:
            t0 = time.monotonic()
            try:
                row = {"case": name, "status": "ok", **fn()}
            except Exception as exc:  # recorded, never raised: the run goes on past a failing case
                row = {
                    "case": name,
                    "status": "oom" if "out of memory" in str(exc).lower() else "failed",
                    "error": f"{type(exc).__name__}: {str(exc)[:400]}",
                    "trace": traceback.format_exc()[-1500:],
                }
            row["case_s"] = round(time.monotonic() - t0, 2)
            free_memory()
        self.data["cases"].append(row)
        self.save()
        print(
            f"[{self.name}] {name}: {row['status']}"
            + (f" {row.get('error', '')}" if row["status"] != "ok" else ""),
            flush=True,
        )
        return row

    def finish(self, **extra: Any) -> None:
        statuses = {c["status"] for c in self.data["cases"]}
        self.data.update(extra)
        self.data["status"] = "ok" if statuses <= {"ok"} else "partial"
        self.save()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed_steps(step: Callable[[], None], steps: int) -> dict[str, Any]:
    """One warm-up step (allocates optimizer state, autotunes kernels), then ``steps`` timed ones:
    median wall time per step and the peak of ``torch.cuda.max_memory_allocated`` over them (on
    CPU: no memory figure, the dry run only checks that the code runs)."""
    import torch

    cuda = torch.cuda.is_available()
    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"step_s": round(statistics.median(times), 4), "steps_timed": steps}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        out["held_after_gib"] = round(torch.cuda.memory_allocated() / GIB, 3)
    return out


def arguments(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for part-<name>.json")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: checks the code, times nothing")
    p.add_argument("--budget", type=float, default=120.0, help="seconds; later cases are skipped")
    return p.parse_args()


def main_guard(run: Callable[[], None]) -> None:
    """Exit 0 even when a part fails as a whole: the failure is in its JSON, and run.sh goes on."""
    try:
        run()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
