"""Install the carried wheels (``.whl/``) that the GPU image lacks into a target folder.

A wheel whose top-level package the image already imports is left out, so a carried copy never
shadows the image's own (a second ``requests`` or ``packaging`` next to transformers' would be a
needless risk). Then ``from diffusers import WanTransformer3DModel`` is tried with the target on
the path; if the first diffusers wheel does not work with the image's huggingface_hub, the next
carried one is tried. Prints what it did, one line per wheel; exit 0 even when diffusers fails
(part 1's tiny-Wan cases then fail, and the report says so).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def top_level(wheel: Path) -> list[str]:
    """The importable names a wheel installs (from its RECORD: top folders with an __init__.py,
    and top-level modules)."""
    names: set[str] = set()
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            first, _, rest = n.partition("/")
            if first.endswith((".dist-info", ".data")) or first.endswith(".libs"):
                continue
            if rest == "__init__.py":
                names.add(first)
            elif not rest and first.endswith(".py"):
                names.add(first[:-3])
    return sorted(names)


def install(wheels: list[Path], target: Path) -> None:
    """``pip install --no-index --no-deps --no-compile --target``; a wheel is a zip archive laid
    out as site-packages, so without pip it is unpacked as is (no scripts are needed here)."""
    if not wheels:
        return
    has_pip = importlib.util.find_spec("pip") is not None
    if has_pip:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--upgrade",
            "--target",
            str(target),
            *map(str, wheels),
        ]
        if subprocess.run(cmd).returncode == 0:
            return
        print("pip install failed; unpacking the wheels instead", flush=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(target)


def diffusers_works(target: Path) -> bool:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    code = "from diffusers import WanTransformer3DModel"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 0


def main() -> int:
    folder, target = Path(sys.argv[1]), Path(sys.argv[2])
    target.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("*.whl"))
    diffusers = sorted((w for w in wheels if w.name.startswith("diffusers-")), reverse=True)
    missing = []
    for w in wheels:
        if w in diffusers:
            continue
        names = top_level(w)
        have = [n for n in names if importlib.util.find_spec(n) is not None]
        # installed unless every package it brings is already importable (a partial match, e.g.
        # pytest's small top-level `py` module present without pytest, still needs the wheel)
        present = bool(names) and len(have) == len(names)
        print(f"{w.name}: {'in the image' if present else 'installing'}", flush=True)
        if not present:
            missing.append(w)
    install(missing, target)
    if importlib.util.find_spec("diffusers") is not None:
        print("diffusers: in the image", flush=True)
        return 0
    for w in diffusers:
        install([w], target)
        if diffusers_works(target):
            print(f"{w.name}: installed, WanTransformer3DModel imports", flush=True)
            return 0
        print(f"{w.name}: does not import with this image; removing it", flush=True)
        for p in target.glob("diffusers*"):
            shutil.rmtree(p, ignore_errors=True)
    print("diffusers: none works; the tiny-Wan test cases will fail", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
