"""The estimate against the real engine: the bytes of the tensors the engine, the optimizer and
the delta writer really hold after training steps on a tiny Wan (bench/estimate_check.py runs the
larger matrix and prints the table in docs/estimate.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

_spec = importlib.util.spec_from_file_location(
    "estimate_check", Path(__file__).resolve().parents[1] / "bench" / "estimate_check.py"
)
assert _spec is not None and _spec.loader is not None
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

EXACT = ("base", "proxies", "gradients", "optimizer", "indices", "workspace")


@pytest.mark.parametrize(
    ("ff", "selector", "optimizer"),
    [(0.01, "spread", "adamw"), (0.05, "spread", "adamw8bit"), (0.05, "compat-v2", "adafactor")],
)
def test_held_bytes_match_the_engine_exactly(ff, selector, optimizer):
    r = check.measure("s", ff, selector, optimizer, steps=1)
    for part in EXACT:
        assert r["estimated"][part] == r["measured"][part], part
    # exact but for the file name and architecture in the header (the bench's own: 'd', a class)
    assert abs(r["estimated"]["delta"] - r["measured"]["delta"]) <= 32
