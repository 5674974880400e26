"""The ComfyUI node package (``comfyui_ffid/``) against ComfyUI's own loading and patching code.

ComfyUI's core is not installed here: the pinned snapshot in ``shared/third_party/comfyui`` is
run from a separate environment (``.venv-comfy``, created by ``.ci/run``: it sees the packages of
the Python that runs the tests and adds what ComfyUI imports beyond them, torchsde, einops, av and
pydantic-settings), so that ComfyUI's dependencies never change the versions ffid's own tests
run with. The checks themselves are in ``tests/comfyui/comfy_checks.py``;
this test runs them there with that environment's Python and reports their result. The same
environment runs ``tests/comfyui/adapter_checks.py`` (the weight-adapter contract of newer ComfyUI
releases, simulated) and, when ComfyUI-GGUF's source and the ``gguf`` package are there,
``tests/comfyui/gguf_checks.py`` (deltas on GGUF models loaded by ComfyUI-GGUF's loader).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = REPO / "tests" / "comfyui" / "comfy_checks.py"
ADAPTER_CHECKS = REPO / "tests" / "comfyui" / "adapter_checks.py"
GGUF_CHECKS = REPO / "tests" / "comfyui" / "gguf_checks.py"
VENV_HINT = "bash .ci/run builds it; or set FFID_COMFYUI_PYTHON to a python with ComfyUI's requirements"


def _shared(env_var: str, folder: str, marker: str) -> Path | None:
    """$``env_var``, else shared/third_party/``folder`` beside the checkout (CI: ../shared) or one
    level higher (a worktree inside a folder of worktrees), if it holds ``marker``."""
    env = os.environ.get(env_var)
    candidates = [Path(env)] if env else [p / "shared" / "third_party" / folder for p in REPO.parents[:2]]
    return next((p for p in candidates if (p / marker).is_file()), None)


def _comfy_dir() -> Path | None:
    """ComfyUI's core."""
    return _shared("FFID_COMFYUI_DIR", "comfyui", "comfy/model_patcher.py")


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


def _comfy_env() -> tuple[Path, dict[str, str]]:
    """The ComfyUI environment's Python and the environment variables the checks read."""
    comfy = _comfy_dir()
    if comfy is None:
        _skip(
            "ComfyUI core not found (shared/third_party/comfyui beside the checkout, or $FFID_COMFYUI_DIR): "
            "the ComfyUI node tests need it"
        )
    python = _comfy_python()
    if not python.is_file():
        _skip(f"no ComfyUI environment at {python}: create it as .ci/run does ({VENV_HINT})")
    return python, dict(os.environ, FFID_COMFYUI_DIR=str(comfy), PYTHONPATH=str(REPO / "src"))


def _run_checks(python: Path, env: dict[str, str], *files: Path) -> None:
    cmd = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, files)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"ComfyUI checks failed (rc {proc.returncode}):\n{out[-12000:]}"


def test_comfyui_node_on_comfyui_patching_code():
    python, env = _comfy_env()
    _run_checks(python, env, CHECKS, ADAPTER_CHECKS)


def test_comfyui_node_on_comfyui_gguf_models():
    python, env = _comfy_env()
    gguf_src = _shared("FFID_COMFYUI_GGUF_DIR", "comfyui-gguf", "nodes.py")
    if gguf_src is None:
        _skip(
            "ComfyUI-GGUF source not found (shared/third_party/comfyui-gguf beside the checkout, or "
            "$FFID_COMFYUI_GGUF_DIR): the GGUF model tests need it"
        )
    probe = subprocess.run([str(python), "-c", "import gguf"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        _skip(
            f"no gguf package in {python}: .ci/run installs it from ComfyUI-GGUF's requirements.txt "
            f"(or: {python} -m pip install 'gguf>=0.13.0')"
        )
    _run_checks(python, dict(env, FFID_COMFYUI_GGUF_DIR=str(gguf_src)), GGUF_CHECKS)
