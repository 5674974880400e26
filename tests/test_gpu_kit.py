"""The GPU kit (bench/gpu): its dry run end to end, and the pieces a GPU run depends on that can be
checked without one (the plain-torch Wan's shapes, the report's handling of failed and killed
parts, the extrapolation, installing the carried wheels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import install  # noqa: E402
import kit  # noqa: E402
import part_shapes  # noqa: E402
import report  # noqa: E402
import wan  # noqa: E402

from ffid import plan  # noqa: E402
from ffid.presets.wan import WAN_CONFIGS, wan_shapes  # noqa: E402


@pytest.mark.slow
def test_dry_run_writes_a_report_with_every_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path),
        PYTHONPATH=str(ROOT / "src"),
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu-log.txt", "gpu-report.json", "gpu-report.md"]  # the device tool returns <= 8
    rep = json.loads((out / "gpu-report.json").read_text())
    assert rep["dry_run"] is True and rep["machine"]["torch"] == torch.__version__
    assert set(rep["parts"]) == set(report.PARTS)
    for name, part in rep["parts"].items():
        assert part["status"] == "ok", (name, [c for c in part["cases"] if c["status"] != "ok"])
        assert part["exit_code"] == 0 and part["cases"], name
        assert all(c["status"] == "ok" for c in part["cases"]), name
    tests = {c["case"]: c for c in rep["parts"]["tests"]["cases"]}
    assert tests["matrix-on-device"]["passed"] > 0
    shapes = rep["parts"]["shapes"]
    assert set(shapes["estimates"]) == {"width", "14b", "1.3b"}
    assert all(e["gpu_total_gib"] > 0 for e in shapes["estimates"].values())
    assert [r["variant"] for r in shapes["extrapolated"]] == ["floor", "full", "lora", "ffid"] * 2
    assert len(shapes["against_estimate"]) == 3
    big = rep["parts"]["14b"]
    swapped = [c for c in big["cases"] if c["blocks_to_swap"]]
    assert swapped and all(c["block_moves_per_step"] > 0 for c in swapped)  # the swap code ran
    assert {c["rule"] for c in rep["parts"]["paths"]["cases"]} <= {"sampled", "dense", "chunked"}
    md = (out / "gpu-report.md").read_text()
    assert "DRY RUN" in md and all(title in md for title in report.PARTS.values())


def test_the_plain_wan_has_the_preset_names_and_shapes() -> None:
    # So that ffid plans, attaches and estimates the kit's model exactly as a real checkpoint.
    for name in ("wan2.1-t2v-14b", "wan2.1-t2v-1.3b"):
        cfg = WAN_CONFIGS[name]
        with torch.device("meta"):
            model = wan.WanDiT(cfg)
        got = {n: tuple(p.shape) for n, p in model.named_parameters()}
        assert got == wan_shapes(cfg), name
        # the same selection as on the preset (so as on a real checkpoint of that model)
        assert plan(model.to(torch.bfloat16), 0.01, 1).fingerprint == plan(name, 0.01, 1).fingerprint


def test_the_plain_wan_trains_and_checkpointing_changes_no_gradient() -> None:
    cfg = wan.config("wan2.1-t2v-14b", 2, dim=32, ffn_dim=48, num_heads=2, text_dim=16, freq_dim=8)
    model = wan.build(cfg, "cpu", torch.float32)
    data = wan.inputs(cfg, wan.Clip(1, 4, 4, 3), "cpu", torch.float32)
    grads = []
    for ckpt in (False, True):
        model.checkpointing = ckpt
        model.zero_grad()
        out = model(data["latents"], data["t"], data["text"])
        assert out.shape == data["target"].shape
        torch.nn.functional.mse_loss(out, data["target"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    rank = wan.lora_rank(model, 10_000)
    params = wan.add_lora(model, rank)
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_report_records_killed_failed_and_missing_parts(tmp_path: Path) -> None:
    part = kit.Part("tests", tmp_path, True, 60)
    part.case("breaks", lambda: 1 / 0)
    part.case("runs", lambda: {"passed": 3})
    part.finish()
    (tmp_path / "rc-tests").write_text("0\n")
    shapes = kit.Part("shapes", tmp_path, True, 60)  # killed mid-part: status stays "running"
    shapes.case("14b-width-1b-floor-ckpt0", lambda: {"step_s": 1.0})
    (tmp_path / "rc-shapes").write_text("124\n")
    (tmp_path / "rc-14b").write_text("1\n")  # crashed before writing anything
    rep = report.collect(tmp_path, dry_run=True)
    parts = rep["parts"]
    assert parts["tests"]["status"] == "partial"
    assert [c["status"] for c in parts["tests"]["cases"]] == ["failed", "ok"]
    assert "ZeroDivisionError" in parts["tests"]["cases"][0]["error"]
    assert parts["shapes"]["status"] == "timeout" and len(parts["shapes"]["cases"]) == 1
    assert parts["14b"]["status"] == "failed" and parts["paths"]["status"] == "not run"
    md = report.markdown(rep)
    assert "## 2. The engine at real Wan shapes: timeout" in md and "ran past its time limit" in md


def test_a_spent_budget_skips_cases_and_says_so(tmp_path: Path) -> None:
    part = kit.Part("paths", tmp_path, True, budget_s=0.0)
    row = part.case("late", lambda: {"x": 1})
    assert row["status"] == "skipped" and "budget" in row["why"]


def test_extrapolation_is_the_per_block_slope(tmp_path: Path) -> None:
    part = kit.Part("shapes", tmp_path, True, 60)
    for blocks, step, peak in ((1, 1.0, 10.0), (3, 2.0, 14.0)):
        part.case(f"14b-width-{blocks}b-ffid-ckpt1", lambda s=step, p=peak: {"step_s": s, "peak_gib": p})
    (row,) = part_shapes.extrapolate(part, (1, 3), 40)
    assert row["variant"] == "ffid" and row["checkpointing"] is True
    assert row["step_s"] == pytest.approx(1.0 + 39 * 0.5) and row["peak_gib"] == pytest.approx(10.0 + 39 * 2)


def test_install_unpacks_a_missing_wheel(tmp_path: Path, monkeypatch) -> None:
    wheel = tmp_path / "ffidkitprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ffidkitprobe/__init__.py", "VALUE = 7\n")
        z.writestr("ffidkitprobe-1.0.dist-info/RECORD", "")
    assert install.top_level(wheel) == ["ffidkitprobe"]
    monkeypatch.setattr(install.importlib.util, "find_spec", lambda name: None)  # no pip either
    target = tmp_path / "site"
    install.install([wheel], target)
    assert (target / "ffidkitprobe" / "__init__.py").read_text() == "VALUE = 7\n"
