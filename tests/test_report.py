"""Reports: summary numbers, per-block rows and flags, JSON, renderers, overlap matrix, plot."""

from __future__ import annotations

import io
import json

import pytest
from tests.tiny_models import tiny_mlp

import ffid
from ffid import report
from ffid.errors import ConfigError
from ffid.manifest import Manifest, TensorInfo
from ffid.names import BlockKey


@pytest.fixture(scope="module")
def spread14():
    return ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=1)


def test_flag_rule():
    assert report.flag_rate(0.0, 0.001) == "LOW"
    assert report.flag_rate(0.0746, 0.001) == "HIGH"
    assert report.flag_rate(0.0746, 0.05) == "HIGH"  # 1.49x the target
    assert report.flag_rate(0.0001, 0.01) == "LOW"
    assert report.flag_rate(0.0101, 0.01) is None
    assert report.flag_rate(0.0124, 0.01) is None and report.flag_rate(0.0126, 0.01) == "HIGH"
    assert report.flag_rate(0.0081, 0.01) is None and report.flag_rate(0.0079, 0.01) == "LOW"
    assert report.flag_rate(0.012, 0.01, tolerance=1.1) == "HIGH"


def test_summary_of_a_spread_selection(spread14):
    s = report.summarize(spread14)
    assert (s.total_params, s.target, s.selected) == (14_288_491_584, 142_884_916, 142_884_916)
    assert (s.tensors_touched, s.tensors_total, s.blocks_covered, s.blocks_total) == (1095, 1095, 40, 40)
    assert s.capacity == 893_030_724 and s.capacity_fraction == pytest.approx(1 / 16, rel=1e-6)
    assert s.fingerprint == spread14.fingerprint and len(s.fingerprint) == 16
    assert s.params == {"ff": 0.01, "ffid": 1, "slots": 16, "seed": 0}
    d = s.to_dict()
    assert d["selected_fraction"] == pytest.approx(0.01)
    json.dumps(d)


def test_summary_of_compat_v2_and_of_filters():
    s = report.summarize(ffid.plan("wan2.2-t2v-14b", ff=0.001, ffid=1, selector="compat-v2"))
    assert s.capacity is None and (s.tensors_touched, s.blocks_covered) == (44, 40)
    s = report.summarize(ffid.plan("wan2.2-t2v-14b", ff=0.001, ffid=1, include=[r"^blocks\.[0-4]\."]))
    assert s.tensors_eligible == 5 * 27 and s.blocks_covered == 5 and s.blocks_total == 40


def test_block_rows_add_up_and_spread_is_flat(spread14):
    rows = report.block_rows(spread14)
    assert len(rows) == 41 and rows[-1].label == "other" and rows[-1].block is None
    assert sum(r.selected for r in rows) == spread14.selected
    assert sum(r.total for r in rows) == spread14.total_params
    assert all(r.flag is None for r in rows)  # every block within 1.25x of 1%
    assert rows[0].what() == "27/27 tensors" and rows[-1].what() == "15/15 tensors"
    assert report.format_block_line(rows[0]) == (
        "Block 00: 1.00% selected (3,513,945 / 351,394,304 params) | Selected: 27/27 tensors"
    )
    assert report.format_block_line(rows[-1]).startswith("Other: 1.00% selected (2,327,194 / 232,719,424")


def test_compat_rows_list_local_names():
    sel = ffid.plan("wan2.2-t2v-14b", ff=0.001, ffid=1, selector="compat-v2")
    row = report.block_rows(sel)[0]
    assert row.picked == ["cross_attn.norm_q.weight", "cross_attn.o.bias"] and row.flag == "LOW"
    line = report.format_block_line(row)
    assert line == (
        "Block 00: 0.00% selected (10,240 / 351,394,304 params) | "
        "Selected: [cross_attn.norm_q.weight, cross_attn.o.bias] [LOW]"
    )


def test_several_block_groups_get_group_labels():
    m = Manifest(
        [TensorInfo(f"transformer_blocks.{i}.w", (8, 8), "F32", "x") for i in range(2)]
        + [TensorInfo(f"single_transformer_blocks.{i}.w", (8, 8), "F32", "x") for i in range(3)]
        + [TensorInfo("proj_out.weight", (4, 8), "F32", "x")]
    )
    rows = report.block_rows(ffid.plan(m, ff=0.05, ffid=0))
    assert [r.label for r in rows] == [
        "single_transformer_blocks.00", "single_transformer_blocks.01", "single_transformer_blocks.02",
        "transformer_blocks.00", "transformer_blocks.01", "other",
    ]
    assert report.local_name("transformer_blocks.1.w", BlockKey("transformer_blocks", 1)) == "w"
    assert report.local_name("model.layers.3.mlp.w", BlockKey("model.layers", 3)) == "mlp.w"


def test_report_dict_schema(spread14):
    d = report.report_dict(spread14)
    assert d["schema"] == report.REPORT_SCHEMA
    assert set(d) == {"schema", "summary", "blocks", "tensors"}
    assert d["blocks"][0] == {
        "block": "00", "group": "blocks", "index": 0, "selected": 3_513_945, "total": 351_394_304,
        "rate": 3_513_945 / 351_394_304, "tensors_touched": 27, "tensors_total": 27, "picked": None,
        "flag": None,
    }
    assert d["tensors"]["head.head.bias"] == {"shape": [64], "count": 2, "whole": False}  # 1 + round(0.64)
    assert sum(t["count"] for t in d["tensors"].values()) == d["summary"]["selected"]
    json.loads(json.dumps(d))


def test_plain_and_rich_renderers(spread14):
    text = report.render_plain(spread14)
    assert "Selection Rate Report (target is 1.00%):" in text
    assert f"Fingerprint: {spread14.fingerprint}" in text
    assert "Capacity of id 1 (16 slots): 893,030,724 params" in text
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, record=True)
    report.render_rich(ffid.plan("wan2.2-t2v-14b", ff=0.001, ffid=1, selector="compat-v2"), console)
    out = console.export_text()
    assert "[cross_attn.norm_q.weight, cross_attn.o.bias]" in out  # brackets not eaten as markup
    assert "HIGH" in out and "LOW" in out


def test_manifest_listing():
    m = ffid.load_manifest("wan2.1-t2v-1.3b")
    rows = report.manifest_rows(m)
    assert len(rows) == 825
    row = next(r for r in rows if r["name"] == "blocks.3.ffn.0.weight")
    assert row == {"name": "blocks.3.ffn.0.weight", "shape": [8960, 1536], "dtype": "BF16",
                   "numel": 8960 * 1536, "block": "03"}
    text = report.render_manifest_plain(m)
    assert "head.head.weight" in text
    assert text.rstrip().endswith("825 tensors, 1,418,996,800 parameters, 30 blocks")


def test_overlap_matrix_zero_between_ids_and_counts_a_real_overlap():
    sels = [ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=i) for i in range(1, 9)]
    mat = report.overlap_matrix(sels)
    assert mat.disjoint and mat.labels[0] == "ffid 1"
    assert [mat.counts[i][i] for i in range(8)] == [s.selected for s in sels]
    assert "All 28 pairs disjoint" in report.render_overlap_plain(mat)
    model = tiny_mlp()
    a, b = ffid.plan(model, ff=0.05, ffid=2), ffid.plan(model, ff=0.02, ffid=2)
    mat = report.overlap_matrix([a, b], ["big", "small"])
    assert mat.counts[0][1] == b.selected and not mat.disjoint
    assert mat.overlapping_pairs == [("big", "small", b.selected)]
    assert "1 of 1 pairs overlap" in report.render_overlap_plain(mat)
    json.dumps(mat.to_dict())


def test_plot_is_written_atomically(tmp_path):
    sels = [ffid.plan("wan2.1-t2v-1.3b", ff=0.01, ffid=i) for i in range(3)]
    path = report.plot_coverage(sels, tmp_path / "coverage.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["coverage.png"]  # no temp file left
    report.plot_coverage(sels[:1], tmp_path / "one.svg")
    assert b"<svg" in (tmp_path / "one.svg").read_bytes()[:400]
    with pytest.raises(ConfigError, match="does not exist"):
        report.plot_coverage(sels, tmp_path / "missing" / "c.png")
    with pytest.raises(ConfigError, match="unknown image format"):
        report.plot_coverage(sels, tmp_path / "c.xyz")
    assert not (tmp_path / "c.xyz").exists()
