"""The integration examples run end to end (offline, --tiny, a few steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_hf_trainer_example(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    rc = _load("hf_trainer_ffid").main(
        ["--tiny", "--output", str(out), "--max-steps", "2", "--save-steps", "1", "--lr", "1e-2"]
    )
    assert rc == 0
    assert (out / "ffid_delta.safetensors").exists() and (
        out / "checkpoint-2" / "ffid_delta.safetensors"
    ).exists()


def test_diffusers_example(tmp_path, capsys):
    pytest.importorskip("diffusers")
    out = tmp_path / "c1.safetensors"
    assert (
        _load("diffusers_wan_ffid").main(["--tiny", "--steps", "2", "--out", str(out), "--ff", "0.05"]) == 0
    )
    assert out.exists() and "reproduces the trained model: True" in capsys.readouterr().out
