"""Smoke tests of bench/engine_memory.py (the accounting of bytes over the floor) and
bench/tiles.py (the tile kernels it compares), in-process at toy sizes."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))  # engine_memory imports bench/engine.py as `engine`
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _args(variant: str) -> argparse.Namespace:
    return argparse.Namespace(
        dim=32, ffn=0, layers=1, text_dim=32, text_len=8, frames=1, side=8, bf16=True,
        checkpointing=False, threads=1, variant=variant,
    )  # fmt: skip


def test_engine_memory_accounts_for_a_variant() -> None:
    memory = _load("engine_memory")
    r = memory.run_one(_args("spread@0.01"))
    assert r["selected"] > 0 and sum(r["paths"].values()) > 0
    assert r["persistent"]["ffid proxies"] > 0 and r["persistent"]["ffid index tensors"] > 0
    assert any(k.startswith("SelectedMatmul[") for k in r["saved"])  # the engine's saved inputs
    assert r["alloc"]["peak"] > 0 and r["alloc"]["live_at_peak"]
    assert r["rss"]["peak"] >= r["rss"]["runtime"]


def test_tile_kernels_give_the_dense_entries() -> None:
    tiles = _load("tiles")
    tiles.check()
    t = tiles.one(64, 64, 128, torch.float32, 0.05, repeat=1)
    assert {"sampled", "dense", "chunked", "csr-8x8", "tiles 16x16", "tiles 1x16"} <= set(t)
