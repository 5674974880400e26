"""``.ci/run`` fails closed: in CI the real ComfyUI, ComfyUI-GGUF and musubi-tuner suites cannot be skipped.

Their sources live in ``../shared/third_party``; when it was missing or moved, their tests
skipped and CI was green. Here the script runs in a scratch layout with a stand-in ``python``
that only records its calls, so nothing is installed or built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run_ci(root: Path, env_ci: str | None) -> tuple[subprocess.CompletedProcess[str], Path]:
    repo = root / "work" / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    bin_dir, calls = root / "bin", root / "calls.log"
    bin_dir.mkdir()
    for tool in ("python", "ruff"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexit 0\n')
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if env_ci is not None:
        env["CI"] = env_ci
    script = str(repo / ".ci" / "run")
    proc = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    return proc, calls


def test_ci_fails_when_the_real_clients_are_missing(tmp_path: Path) -> None:
    proc, calls = _run_ci(tmp_path, "true")
    assert proc.returncode == 1, proc.stderr
    assert "lacks comfyui musubi-tuner comfyui-gguf" in proc.stderr and "does not skip them" in proc.stderr
    assert not calls.exists(), calls.read_text()  # refused before installing anything


def test_ci_names_the_one_that_is_missing(tmp_path: Path) -> None:
    present = {"comfyui": "comfy/model_patcher.py", "comfyui-gguf": "nodes.py"}
    for n, (have, lacks) in enumerate(
        [(["comfyui"], "musubi-tuner comfyui-gguf ("), (list(present), "musubi-tuner (")]
    ):
        root = tmp_path / str(n)
        for folder in have:
            marker = root / "work" / "shared" / "third_party" / folder / present[folder]
            marker.parent.mkdir(parents=True)
            marker.write_text("")
        proc, calls = _run_ci(root, "true")
        assert proc.returncode == 1 and f"lacks {lacks}" in proc.stderr, proc.stderr
        assert not calls.exists()
