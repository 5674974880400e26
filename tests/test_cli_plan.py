"""`ffid plan` / `ffid overlap`: outputs, id lists, and every bad input of the issue (exit 2, one line)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ffid.cli import main
from ffid.cli.overlap import parse_ids
from ffid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
P14 = "wan2.2-t2v-14b"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_plan_json_is_the_only_stdout(capsys, tmp_path):
    plot = tmp_path / "coverage.png"
    rc, out, err = run(capsys, "plan", P14, "--ff", "0.01", "--ffid", "1", "--json", "--plot", str(plot))
    assert rc == 0
    data = json.loads(out)
    assert data["summary"]["selected"] == data["summary"]["target"] == 142_884_916
    assert len(data["blocks"]) == 41 and len(data["tensors"]) == 1095
    assert plot.read_bytes()[:4] == b"\x89PNG" and "wrote" in err


def test_plan_rich_and_plain(capsys):
    rc, out, _ = run(capsys, "plan", P14, "--ff", "0.001", "--ffid", "1", "--selector", "compat-v2")
    assert rc == 0 and "Fingerprint:" in out and "HIGH" in out
    args = ["--ff", "0.01", "--ffid", "2", "--plain", "--slots", "8", "--seed", "3", "--exclude", "modul"]
    rc, out, _ = run(capsys, "plan", "wan2.1-t2v-1.3b", *args)
    assert rc == 0
    assert "Selector: spread (ff=0.01 ffid=2 slots=8 seed=3 exclude=['modul'])" in out
    assert "Block 29: " in out and "| Selected: 26/27 tensors" in out


def test_plan_list(capsys):
    rc, out, _ = run(capsys, "plan", P14, "--list")
    assert rc == 0 and "blocks.39.ffn.2.weight" in out and "1,095 tensors" in out
    rc, out, _ = run(capsys, "plan", P14, "--list", "--json")
    rows = json.loads(out)["tensors"]
    assert len(rows) == 1095 and {"name", "shape", "dtype", "numel", "block"} <= set(rows[0])


def test_plan_reads_files_indexes_and_folders(capsys, tmp_path):
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama", max_shard_size="20KB", safe_serialization=True)
    prints = set()
    for target in (tmp_path / "llama", tmp_path / "llama" / "model.safetensors.index.json"):
        rc, out, _ = run(capsys, "plan", str(target), "--ff", "0.02", "--ffid", "3", "--json")
        assert rc == 0
        prints.add(json.loads(out)["summary"]["fingerprint"])
    single = tmp_path / "one.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(single))
    rc, out, _ = run(capsys, "plan", str(single), "--ff", "0.02", "--ffid", "3", "--json")
    prints.add(json.loads(out)["summary"]["fingerprint"])
    assert len(prints) == 1


@pytest.mark.parametrize(
    ("text", "ids"),
    [("1-8", list(range(1, 9))), ("1,3,5", [1, 3, 5]), ("0-3,7", [0, 1, 2, 3, 7]), (" 2 - 4 , 2", [2, 3, 4])],
)
def test_parse_ids(text, ids):
    assert parse_ids(text) == ids


@pytest.mark.parametrize("bad", ["8-1", "a", "1-", "3", "1,,2", "-1"])
def test_parse_ids_errors(bad):
    with pytest.raises(ConfigError, match="--ffids"):
        parse_ids(bad)


@pytest.mark.parametrize("selector", ["spread", "compat-v2"])
def test_overlap_json(capsys, selector, tmp_path):
    ids = "1-8" if selector == "spread" else "0-7"
    plot = tmp_path / "ov.png"
    rc, out, _ = run(capsys, "overlap", P14, "--ff", "0.01", "--ffids", ids, "--selector", selector,
                     "--json", "--plot", str(plot))
    assert rc == 0
    data = json.loads(out)
    assert data["disjoint"] is True and data["overlapping_pairs"] == []
    assert len(data["matrix"]) == 8
    assert all(data["matrix"][i][j] == 0 for i in range(8) for j in range(8) if i != j)
    assert plot.exists()


def test_overlap_rich_and_plain(capsys):
    rc, out, _ = run(capsys, "overlap", P14, "--ff", "0.01", "--ffids", "1,3,5")
    assert rc == 0 and "All 3 pairs disjoint" in out
    rc, out, _ = run(capsys, "overlap", P14, "--ff", "0.01", "--ffids", "1,3,5", "--plain")
    assert rc == 0 and "ffid 5" in out and "All 3 pairs disjoint" in out


# -- bad input: exit 2, one line, no traceback ---------------------------------------------------
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    files["text"] = tmp_path / "text.safetensors"
    files["text"].write_text("definitely not a safetensors file")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    files["cut_header"] = tmp_path / "cut_header.safetensors"
    files["cut_header"].write_bytes(struct.pack("<Q", len(header)) + header[:10])
    files["corrupt"] = tmp_path / "corrupt.safetensors"
    files["corrupt"].write_bytes(struct.pack("<Q", 24) + b"{this is not json}      " + b"\0" * 16)
    files["cut_data"] = tmp_path / "cut_data.safetensors"
    files["cut_data"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    files["ints"] = tmp_path / "ints.safetensors"
    save_file({"position_ids": torch.arange(8)}, str(files["ints"]))
    return files


BAD_PLAN_ARGS = {
    "ff zero": (["--ff", "0", "--ffid", "1"], "--ff '0' is out of range"),
    "ff negative": (["--ff", "-0.1", "--ffid", "1"], "--ff '-0.1' is out of range"),
    "ff above 1": (["--ff", "1.5", "--ffid", "1"], "--ff '1.5' is out of range"),
    "ff nan": (["--ff", "nan", "--ffid", "1"], "--ff 'nan' is out of range"),
    "ff inf": (["--ff", "inf", "--ffid", "1"], "--ff 'inf' is out of range"),
    "ff text": (["--ff", "abc", "--ffid", "1"], "--ff 'abc' is not a number"),
    "ff missing": (["--ffid", "1"], "--ff is required"),
    "ffid negative": (["--ff", "0.01", "--ffid", "-1"], "--ffid '-1' must be a non-negative integer"),
    "ffid text": (["--ff", "0.01", "--ffid", "x"], "--ffid 'x' is not an integer"),
    "ffid float": (["--ff", "0.01", "--ffid", "1.5"], "--ffid '1.5' is not an integer"),
    "ffid beyond spread": (["--ff", "0.01", "--ffid", "16"], "outside the layout's ids 0..15"),
    "ffid beyond compat": (["--ff", "0.1", "--ffid", "8", "--selector", "compat-v2"], "pools numbered 0..7"),
    "capacity": (["--ff", "0.5", "--ffid", "1"], "lower --ff to at most 0.0625"),
    "selector": (["--ff", "0.01", "--ffid", "1", "--selector", "sprd"], "did you mean 'spread'"),
    "slots": (["--ff", "0.01", "--ffid", "1", "--slots", "0"], "--slots '0' must be at least 1"),
    "seed": (["--ff", "0.01", "--ffid", "1", "--seed", "x"], "--seed 'x' is not an integer"),
    "compat options": (["--ff", "0.1", "--ffid", "1", "--selector", "compat-v2", "--seed", "1"], "options"),
    "include miss": (["--ff", "0.01", "--ffid", "1", "--include", "modulaton"], "did you mean 'modulation'"),
    "exclude all": (["--ff", "0.01", "--ffid", "1", "--exclude", "."], "leave no tensor"),
    "bad regex": (["--ff", "0.01", "--ffid", "1", "--include", "(x"], "not a valid regular expression"),
    "block pattern": (["--ff", "0.01", "--ffid", "1", "--block-pattern", "blocks"], "no capturing group"),
    "plot folder": (["--ff", "0.01", "--ffid", "1", "--plot", "/nonexistent/dir/c.png"], "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_PLAN_ARGS))
def test_bad_plan_arguments(capsys, case):
    args, message = BAD_PLAN_ARGS[case]
    rc, out, err = run(capsys, "plan", P14, *args)
    assert rc == 2 and out == ""
    assert err.startswith("ffid plan: error: ") and err.count("\n") == 1
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "neither an existing file or folder nor a preset"),
        ("text", "not a safetensors file or is truncated"),
        ("cut_header", "not a safetensors file or is truncated"),
        ("corrupt", "corrupt safetensors header"),
        ("cut_data", "is truncated: its header describes 16 bytes"),
        ("ints", "no floating-point tensors"),
        ("empty folder", "holds no .safetensors file"),
    ],
)
def test_bad_model_files(capsys, tmp_path, case, message):
    files = _bad_files(tmp_path)
    files["missing"] = tmp_path / "nope.safetensors"
    files["empty folder"] = tmp_path / "empty"
    files["empty folder"].mkdir()
    for command in (["plan", str(files[case]), "--ff", "0.01", "--ffid", "1"],
                    ["overlap", str(files[case]), "--ff", "0.01"]):
        rc, out, err = run(capsys, *command)
        assert rc == 2 and out == "" and err.count("\n") == 1
        assert message in err and "Traceback" not in err


def test_module_without_parameters_via_python_api():
    import ffid

    with pytest.raises(ConfigError, match="no floating-point parameters"):
        ffid.plan(torch.nn.Identity(), ff=0.01, ffid=1)


def test_real_process_exit_code_and_debug_traceback():
    cmd = [sys.executable, "-m", "ffid", "plan", P14, "--ff", "2", "--ffid", "1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "ffid plan: error: --ff '2' is out of range; it is the fraction of the model to train, "
        "0 < ff <= 1 (e.g. 0.01)"
    ]
    debug = [sys.executable, "-m", "ffid", "--debug", *cmd[3:]]
    res = subprocess.run(debug, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" in res.stderr


def test_plan_of_a_row_selection_prints_the_projection_costs(capsys):
    """Under ``--selector rows`` (what preserve_method = 'projection' trains) the plan adds the
    bases' memory bound and the feature pass's work at the seed's 480x832, 81 frames."""
    argv = [P14, "--ff", "0.01", "--ffid", "1", "--selector", "rows", "--include", r"^blocks\."]
    rc, out, _ = run(capsys, "plan", *argv)
    assert rc == 0
    assert "Projection bases (preserve_method = 'projection'): at most 31.82 GiB fp32 over 400" in out
    assert "Feature pass (32,760 tokens/video, 4,096 of them sampled into each Gram): 96 DiT forwards" in out
    assert "not timed" in out and "as much as 32 training steps" in out
    rc, out, _ = run(capsys, "plan", *argv, "--json")
    data = json.loads(out)
    fp = data["feature_pass"]
    assert fp["tokens"] == 21 * 30 * 52 and fp["forwards"] == 2 * 4 * (10 + 2) and fp["inputs"] == 16
    assert fp["budget"] == 4096
    # one Gram per input read: per block q/k/v share one, o, cross q, cross o, ffn.0 (width 5120)
    # and ffn.2 (13824), float32; every block's cross K/V share one text Gram, float64
    assert fp["gram_bytes"] == 40 * (5 * 5120**2 + 13824**2) * 4 + 5120**2 * 8
    rc, out, _ = run(capsys, "plan", P14, "--ff", "0.01", "--ffid", "1")
    assert "Feature pass" not in out and "Projection bases" not in out  # spread: no projection


def test_feature_pass_groups_and_token_budget():
    """The estimate folds one Gram per input read (as the feature pass does), and the token
    budget cuts the image side's products, not the text side's."""
    from ffid.estimate.projection import feature_pass_cost, input_group
    from ffid.models import load_manifest
    from ffid.presets.wan import wan_shape
    from ffid.select import plan

    assert input_group("blocks.3.self_attn.q.weight") == input_group("blocks.3.self_attn.v.weight")
    assert input_group("blocks.3.self_attn.q.weight") != input_group("blocks.4.self_attn.q.weight")
    assert input_group("blocks.0.cross_attn.k.weight") == input_group("blocks.9.cross_attn.v.weight")
    assert input_group("blocks.0.attn2.to_k.weight") == input_group("blocks.0.cross_attn.k.weight")
    assert input_group("blocks.0.cross_attn.q.weight") == "blocks.0.cross_attn.q.weight"
    manifest = load_manifest(P14)
    sel = plan(manifest, 0.01, 1, "rows", include=[r"^blocks\."])
    shape = wan_shape(manifest)
    assert shape is not None
    whole = feature_pass_cost(sel, shape, 32760, 2, budget=0)
    part = feature_pass_cost(sel, shape, 32760, 2)
    assert part.exact_flops == whole.exact_flops > 0
    image = (whole.gram_flops - whole.exact_flops) / (part.gram_flops - part.exact_flops)
    assert image == pytest.approx(32760 / 4096)
    assert part.gram_bytes == whole.gram_bytes and part.forwards == whole.forwards
