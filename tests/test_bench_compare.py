"""CI smoke of ``bench/compare.py --quick``: every method runs end to end and produces numbers.

The speed/memory targets are checked by the benchmark itself (it prints PASS/MISS); here only
that the harness works: a tiny Wan DiT, a few steps, every method measured and reported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("diffusers")


def _load_compare():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_every_method(tmp_path, capsys):
    compare = _load_compare()
    argv = ["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--lr-grid", "3e-3"]
    assert compare.main(argv) == 0

    data = json.loads((tmp_path / "compare-quick.json").read_text())
    by = {r["label"]: r for r in data["results"]}
    expected = {"floor", "full", "original", "lora", "shira"} | {f"ffid@{ff:g}" for ff in compare.FFS}
    assert set(by) == expected

    for label, r in by.items():
        assert r["step_s"] > 0, label
        assert len(r["step_times"]) == r["warmup"] + r["steps"], label
        assert r["peak_mem"] > 0, label
        assert r["eval_loss"] is not None and math.isfinite(r["eval_loss"]), label
        assert all(math.isfinite(x) for x in r["train_losses"]), label
        if label == "floor":
            assert r["trainable"] == 0 and r["opt_state_bytes"] == 0 and r["output_bytes"] is None
        else:
            assert r["trainable"] > 0, label
            assert r["opt_state_bytes"] > 0, label
            assert r["output_bytes"] > 0, label

    # Counts are what each method says it trains: ffid exactly round(ff * N), full FT everything,
    # LoRA and SHiRA the same r * (in + out) per adapted Linear.
    total = by["full"]["total_params"]
    assert by["full"]["trainable"] == total
    for ff in compare.FFS:
        assert by[f"ffid@{ff:g}"]["trainable"] == round(ff * total)
    assert by["lora"]["trainable"] == by["shira"]["trainable"]
    # AdamW keeps two fp32 moments per trainable value (plus a step counter per tensor).
    f = by["ffid@0.01"]
    assert 8 * f["trainable"] <= f["opt_state_bytes"] <= 8 * f["trainable"] + 64 * f["info"]["tensors"]
    # Methods that train something move the loss away from the untrained base's.
    assert by["full"]["eval_loss"] != by["floor"]["eval_loss"]

    # --lr-grid: every trained method again at lr 3e-3, and the best of both rates is picked
    for label, r in by.items():
        if label != "floor":
            assert set(r["loss_by_lr"]) == {"0.001", "0.003"}, label  # JSON keys are strings
            assert r["best_loss"] == min(r["loss_by_lr"].values()), label
    names = {c["name"] for c in data["checks"]}
    assert "ffid loss after N <= LoRA, each at its best learning rate of the grid" in names
    assert any("LoRA" in n for n in names) and any("floor" in n for n in names)
    out = capsys.readouterr().out
    assert "| method |" in out and ("PASS" in out or "MISS" in out)
    assert (tmp_path / "compare-quick.md").read_text().startswith("Command: `python bench/compare.py --quick")
