"""Hostile inputs, one class of the hardening issue per section: each test failed before its fix."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from tests.test_train import TinyTask, cfg_for

from ffid.errors import ModelFileError
from ffid.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


# 1. No code execution from files ------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted state file from a stranger would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_resume_from_a_crafted_state_runs_no_code(tmp_path: Path, name: str) -> None:
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    marker = tmp_path / "pwned"
    import torch

    torch.save({"x": _Payload(marker)}, state / name)
    with pytest.raises(ModelFileError, match="never runs code"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
    assert not marker.exists()
    # a raw pickle (not a torch zip) is refused the same way
    (state / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelFileError, match="never runs code"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
    assert not marker.exists()


def test_resume_from_a_truncated_state_is_one_line(tmp_path: Path) -> None:
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    for name in ("optimizer.pt", "proxies.safetensors"):
        data = (state / name).read_bytes()
        (state / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match="corrupt"):
            train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
        (state / name).write_bytes(data)


def test_resume_from_a_state_with_a_wrong_structure_is_one_line(tmp_path: Path) -> None:
    import torch

    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    torch.save({"state": {}, "param_groups": "nope"}, state / "optimizer.pt")
    with pytest.raises(ModelFileError, match="does not fit this run"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())


def test_no_unsafe_loader_in_the_sources() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for bad in ("weights_only=False", "pickle.load", "pickle.loads"):
            assert bad not in text, f"{path}: {bad}"
