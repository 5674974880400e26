"""The ComfyUI node package (``comfyui_ffid/``) against ComfyUI's own loading and patching code.

ComfyUI's core is not installed here: the pinned snapshot in ``shared/third_party/comfyui`` is
run from a separate environment (``.venv-comfy``, created by ``.ci/run``: it sees the packages of
the Python that runs the tests and adds what ComfyUI imports beyond them, torchsde, einops, av and
pydantic-settings), so that ComfyUI's dependencies never change the versions ffid's own tests
run with. The checks themselves are in ``tests/comfyui/comfy_checks.py``;
this test runs them there with that environment's Python and reports their result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "comfyui" / "comfy_checks.py"
VENV_HINT = "bash .ci/run builds it; or set FFID_COMFYUI_PYTHON to a python with ComfyUI's requirements"


def _comfy_dir() -> Path | None:
    """ComfyUI's core: $FFID_COMFYUI_DIR, else shared/third_party/comfyui beside the checkout
    (CI: ../shared) or one level higher (a worktree inside a folder of worktrees)."""
    env = os.environ.get("FFID_COMFYUI_DIR")
    candidates = [Path(env)] if env else [p / "shared" / "third_party" / "comfyui" for p in REPO.parents[:2]]
    return next((p for p in candidates if (p / "comfy" / "model_patcher.py").is_file()), None)


def _comfy_python() -> Path:
    env = os.environ.get("FFID_COMFYUI_PYTHON")
    if env:
        return Path(env)
    return REPO / ".venv-comfy" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _skip(reason: str) -> None:
    # .ci/run builds the environment and sets FFID_REQUIRE_COMFYUI=1: there a skip would hide a
    # broken setup, so it fails instead
    if os.environ.get("FFID_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"FFID_REQUIRE_COMFYUI=1 but {reason}")
    pytest.skip(reason)


def test_comfyui_node_on_comfyui_patching_code():
    comfy = _comfy_dir()
    if comfy is None:
        _skip(
            "ComfyUI core not found (shared/third_party/comfyui beside the checkout, or $FFID_COMFYUI_DIR): "
            "the ComfyUI node tests need it"
        )
    python = _comfy_python()
    if not python.is_file():
        _skip(f"no ComfyUI environment at {python}: create it as .ci/run does ({VENV_HINT})")
    env = dict(os.environ, FFID_COMFYUI_DIR=str(comfy), PYTHONPATH=str(REPO / "src"))
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"ComfyUI checks failed (rc {proc.returncode}):\n{out[-12000:]}"
