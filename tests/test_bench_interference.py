"""CI smoke of ``bench/interference.py --quick``: every method trains both characters and gets
every column (retention, character2, base classes, step time, memory) and every target a verdict.

Whether the targets are met is the benchmark's own report (PASS/MISS); here only that the
harness works end to end on a tiny model with a few steps.
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


def _load():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_interference", BENCH / "interference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_method_and_column(tmp_path, capsys):
    bench = _load()
    # imported after _load(), which puts bench/ on sys.path
    from interference_methods import METHODS
    from interference_report import TARGETED, TITLES

    argv = ["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache")]
    assert bench.main(argv) == 0

    data = json.loads((tmp_path / "interference-quick.json").read_text())
    assert [r["seed"] for r in data["seeds"]] == [0]
    run = data["seeds"][0]
    assert set(run["methods"]) == set(METHODS)
    assert set(data["memory"]) == set(METHODS)
    for name, m in run["methods"].items():
        for key in (
            "character1_before",
            "character1_after_3a",
            "character1_after_3b",
            "character2_after_3b",
            "base_before",
            "base_after_3a",
            "base_after_3b",
        ):
            assert 0.0 <= m[key] <= 1.0, (name, key)
        assert m["retention"] is None or math.isfinite(m["retention"]), name
        assert m["step_s"] > 0 and m["trainable"] > 0, name
        assert data["memory"][name]["peak_mem"] > 0, name
    assert run["methods"]["ffid plain"]["step_ratio"] == 1.0
    # the three spread variants share one character1
    a3 = {
        run["methods"][m]["character1_after_3a"] for m in ("ffid plain", "ffid rehearsed", "ffid preserved")
    }
    assert len(a3) == 1
    # LoRA is sized like ffid, full FT trains everything
    m = run["methods"]
    assert m["ffid plain"]["trainable"] < m["full"]["trainable"]
    assert m["lora"]["trainable"] < m["full"]["trainable"] / 4

    assert {(c["method"], c["target"].split(" ")[0]) for c in run["checks"]} >= {
        (t, w) for t in TARGETED for w in ("character1", "character2", "base", "step", "peak")
    }
    md = (tmp_path / "interference-quick.md").read_text()
    for title in TITLES.values():
        assert f"| {title} |" in md
    for column in (
        "char1 retention",
        "character2 before → 3b",
        "base classes before / 3a / 3b",
        "step vs plain",
        "peak RSS",
    ):
        assert column in md
    assert "PASS" in md or "MISS" in md
    assert "| ffid preserved |" in capsys.readouterr().out
