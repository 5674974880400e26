"""Smoke test of bench/engine.py's variants in-process (the sweep itself runs them in subprocesses)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

_spec = importlib.util.spec_from_file_location(
    "bench_engine", Path(__file__).resolve().parents[1] / "bench" / "engine.py"
)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = ["--dim", "32", "--layers", "1", "--text-dim", "32", "--frames", "1", "--side", "8", "--steps", "1"]


@pytest.mark.parametrize("variant", ["lora@0.01", "spread@0.01"])
def test_variant_runs_and_reports(variant: str, capsys) -> None:
    assert bench.main([*TINY, "--bf16", "--variant", variant]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["variant"] == variant and r["step"] > 0  # (in-process peak RSS means little here)
    if variant.startswith("spread"):
        assert r["selected"] > 0 and sum(r["paths"].values()) > 0
        assert set(r["paths"]) <= {"sampled", "dense", "chunked"}
    if variant.startswith("lora"):
        assert r["rank"] >= 1 and r["selected"] > 0
