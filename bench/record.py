"""Run a benchmark command and keep what it prints in ``bench/results/<name>.txt``.

For the benchmarks that print their figures instead of writing a results file. The saved file
starts with three lines, then the command's stdout exactly as printed::

    Command: `python bench/merge.py --repeats 6`
    Date: 2026-12-03
    Machine: Linux x86_64, 2 CPUs, torch 2.13.0+cpu

    python bench/record.py merge-cpu -- python bench/merge.py --repeats 6
    python bench/record.py delta-size-wan22-14b -- python bench/delta_size.py

The README quotes these files with their date, and ``tests/test_readme_figures.py`` checks every
quoted figure against the file. Nothing is written when the command fails (its exit code is
returned), and the file is replaced in one rename, so a kill leaves the old results.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def header(argv: list[str]) -> str:
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the benches need torch anyway
        torch_version = "none"
    cmd = " ".join(shlex.quote(a) for a in argv)
    cmd = re.sub(r"^\S*python3?\S*", "python", cmd)  # the interpreter's path says nothing
    return (
        f"Command: `{cmd}`\n"
        f"Date: {datetime.date.today().isoformat()}\n"
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch_version}\n\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not re.fullmatch(r"[A-Za-z0-9._-]+", args[0]):
        print("usage: python bench/record.py NAME -- COMMAND...", file=sys.stderr)
        return 2
    name, cmd = args[0], args[2:]
    if cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        print(f"record: the command failed (exit {done.returncode}); nothing saved", file=sys.stderr)
        return done.returncode
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.txt"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(header(cmd) + done.stdout)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(f"saved {path.relative_to(RESULTS.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
