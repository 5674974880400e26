"""Part 1: the GPU tests and the engine's matrix tests on CUDA.

- ``pytest -m gpu``: the tests marked for a CUDA device (every gradient path under bf16
  autocast on CUDA; musubi-style block swap with AdamW8bit, which needs bitsandbytes: absent
  from the GPU image, so that one is expected to fail and is reported as it is).
- ``FFID_TEST_DEVICE=cuda pytest tests/test_matrix.py -k "every_path or sgd_step"``: every
  gradient path on every matmul route equals masked full finetuning on CUDA in fp32 and bf16,
  and one SGD step on every tiny model x selector x path equals masked full finetuning (the
  tiny Wan needs diffusers: carried as a wheel, see bench/gpu/prepare.sh).

Each run's JUnit XML is read back: counts, and each failure's test id and first lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kit

ROOT = Path(__file__).resolve().parents[2]


def pytest_run(work: Path, name: str, args: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    xml = work / f"junit-{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )
    out: dict[str, Any] = {
        "command": " ".join(f"{k}={v}" for k, v in env.items()) + " pytest " + " ".join(args),
        "exit_code": proc.returncode,
    }
    if not xml.exists():
        out["output_tail"] = (proc.stdout + proc.stderr)[-1500:]
        raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {out['output_tail'][-300:]}")
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[:3]
                failed.append(f"{case.get('classname')}::{case.get('name')}: {kind}: {' '.join(msg)[:300]}")
    out.update(counts, failed=failed)
    if counts["failures"] or counts["errors"]:
        out["status"] = "failed"  # the case is recorded as failed, with its counts
        out["error"] = f"{counts['failures']} failed, {counts['errors']} errors of {counts['tests']}"
    return out


def main() -> None:
    args = kit.arguments(__doc__)
    part = kit.Part("tests", args.work, args.dry_run, args.budget)
    device = "cpu" if args.dry_run else "cuda"
    runs = [
        ("gpu-marked", ["-m", "gpu", "tests/test_engine_paths.py", "tests/test_integrations_musubi.py"], {}),
        (
            "matrix-on-device",
            [
                "-m",
                "not slow",
                "tests/test_matrix.py",
                "-k",
                "every_path_matches and linear" if args.dry_run else "every_path or sgd_step",
            ],
            {"FFID_TEST_DEVICE": device},
        ),
    ]
    for name, pargs, env in runs:

        def run(pargs: list[str] = pargs, env: dict[str, str] = env, name: str = name) -> dict[str, Any]:
            return pytest_run(
                args.work, name, pargs, env, timeout=max(20.0, args.budget - (time.monotonic() - part.start))
            )

        part.case(name, run)
    part.finish(device=device)


if __name__ == "__main__":
    kit.main_guard(main)
