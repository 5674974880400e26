"""The merge / extract / inspect commands: thin wrappers, one-line errors, exit code 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.test_checkpoint import StandInHandle, save_state
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import save_delta
from ffid.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = tiny_wan()
    save_state(model, tmp / "base.safetensors")
    for i in (1, 2):
        save_delta(StandInHandle(model, ffid.plan(model, 0.05, i), seed=i), tmp / f"d{i}.safetensors")
    return tmp


def test_merge_extract_inspect_round_trip(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc = main(
        [
            "merge",
            str(files / "base.safetensors"),
            str(files / "d1.safetensors"),
            str(files / "d2.safetensors"),
            "-o",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    x = tmp_path / "x.safetensors"
    assert main(["extract", str(files / "base.safetensors"), str(out), "-o", str(x), "-q"]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["merge", str(files / "base.safetensors"), str(x), "-o", str(back), "-q"]) == 0
    assert back.read_bytes() == out.read_bytes()
    capsys.readouterr()
    assert main(["inspect", str(files / "d1.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "delta" and report["ffid"] == 1 and report["ff"] == 0.05
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "checkpoint" in text and "params per block" in text


def test_extract_restricted_to_a_selection(files, tmp_path, capsys):
    tuned = tmp_path / "t.safetensors"
    assert (
        main(
            ["merge", str(files / "base.safetensors"), str(files / "d1.safetensors"), "-o", str(tuned), "-q"]
        )
        == 0
    )
    x = tmp_path / "x.safetensors"
    rc = main(
        [
            "extract",
            str(files / "base.safetensors"),
            str(tuned),
            "-o",
            str(x),
            "--ff",
            "0.05",
            "--ffid",
            "1",
            "-q",
        ]
    )
    assert rc == 0
    assert (
        ffid.load_delta(x).info.selection_fingerprint
        == ffid.load_delta(files / "d1.safetensors").info.selection_fingerprint
    )
    y = tmp_path / "y.safetensors"
    rc = main(
        [
            "extract",
            str(files / "base.safetensors"),
            str(tuned),
            "-o",
            str(y),
            "--ff",
            "0.05",
            "--ffid",
            "2",
            "-q",
        ]
    )
    assert rc == 2 and not y.exists()
    assert "outside the selection" in capsys.readouterr().err


def test_merge_multiplier_and_dtype_flags(files, tmp_path):
    out = tmp_path / "m.safetensors"
    rc = main(
        [
            "merge",
            str(files / "base.safetensors"),
            str(files / "d1.safetensors"),
            "-o",
            str(out),
            "--multiplier",
            "0.5",
            "--dtype",
            "bf16",
            "-q",
        ]
    )
    assert rc == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out)).values())


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["merge", "{base}", "{d1}", "{d1}", "-o", "{out}"], "overlap"),
        (["merge", "{base}", "{d1}", "-o", "{base}"], "also an input"),
        (["merge", "{base}", "{d1}", "{d2}", "-o", "{out}", "--multiplier", "1", "2", "3"], "multipliers"),
        (["merge", "{base}", "{d1}", "-o", "{out}", "--dtype", "fp7"], "fp7"),
        (["merge", "{missing}", "{d1}", "-o", "{out}"], "no such file"),
        (["merge", "{d1}", "{base}", "-o", "{out}"], "not an ffid delta"),
        (["extract", "{base}", "{d1}", "-o", "{out}", "--ff", "0.05"], "--ff and --ffid"),
        (["extract", "{base}", "{base}", "-o", "{out}", "--threshold", "-1"], "threshold"),
        (["inspect", "{missing}"], "no such file"),
    ],
)
def test_bad_input_is_one_line_error_exit_2_and_writes_nothing(files, tmp_path, capsys, argv, needle):
    names = {
        "base": files / "base.safetensors",
        "d1": files / "d1.safetensors",
        "d2": files / "d2.safetensors",
        "out": tmp_path / "out.safetensors",
        "missing": tmp_path / "missing.safetensors",
    }
    before = {p: p.read_bytes() for p in files.iterdir()}
    rc = main(
        [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
        + (["-q"] if argv[0] != "inspect" else [])
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"ffid {argv[0]}: error:") and needle in err[0]
    assert not (tmp_path / "out.safetensors").exists()
    assert {p: p.read_bytes() for p in files.iterdir()} == before


def test_allow_overlap_adds_changes_and_prints_the_count(files, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    d1 = str(files / "d1.safetensors")
    rc = main(["merge", str(files / "base.safetensors"), d1, d1, "-o", str(out), "--allow-overlap", "-q"])
    assert rc == 0
    selected = ffid.load_delta(d1).selected
    assert f"overlap: {selected:,} positions" in capsys.readouterr().out
