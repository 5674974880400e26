"""compat-v2 reproduces the original v2.0 selections exactly (the seed's logs are the fixture)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ffid
from ffid.cli import main
from ffid.errors import ConfigError
from ffid.selection import overlap

SEED_LOGS = Path(__file__).parent / "data" / "compat_v2_seed_logs.txt"
PRESET = "wan2.2-t2v-14b"


def seed_runs() -> dict[tuple[str, int], dict]:
    """``(ff text, ffid) -> {"header": {...}, "lines": [...]}`` from the fixture."""
    runs: dict[tuple[str, int], dict] = {}
    current = None
    for line in SEED_LOGS.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            header = dict(kv.split("=") for kv in line[3:].split())
            current = {"header": header, "lines": []}
            runs[(header["ff"], int(header["ffid"]))] = current
        elif line.startswith("Block "):
            assert current is not None
            current["lines"].append(line)
    return runs


RUNS = seed_runs()


def test_fixture_holds_the_three_logged_runs():
    assert sorted(RUNS) == [("0.001", 1), ("0.01", 2), ("0.05", 4)]
    for run in RUNS.values():
        assert len(run["lines"]) == 40  # every block of the 14B model is logged


@pytest.mark.parametrize(("ff", "ffid_"), sorted(RUNS))
def test_plain_block_lines_equal_the_seed_logs(ff, ffid_, capsys):
    rc = main(["plan", PRESET, "--ff", ff, "--ffid", str(ffid_), "--selector", "compat-v2", "--plain"])
    out = capsys.readouterr().out
    assert rc == 0
    got = [line for line in out.splitlines() if line.startswith("Block ")]
    assert got == RUNS[(ff, ffid_)]["lines"]
    assert f"Selection Rate Report (target is {float(ff) * 100:.2f}%):" in out


@pytest.mark.parametrize(("ff", "ffid_"), sorted(RUNS))
def test_totals_and_target_match_the_seed(ff, ffid_):
    header = RUNS[(ff, ffid_)]["header"]
    sel = ffid.plan(PRESET, ff=float(ff), ffid=ffid_, selector="compat-v2")
    assert sel.total_params == 14_288_491_584
    assert len(sel) == int(header["tensors"])
    assert sel.selected == int(header["params"])
    assert sel.target == int(header["target"])
    assert all(p.whole for p in sel.values())


def test_the_totals_named_in_the_issue():
    expected = {(0.001, 1): (44, 26_434_560), (0.01, 2): (81, 157_798_400), (0.05, 4): (113, 734_609_920)}
    for (ff, i), (tensors, params) in expected.items():
        sel = ffid.plan(PRESET, ff=ff, ffid=i, selector="compat-v2")
        assert (len(sel), sel.selected) == (tensors, params)


def test_pools_partition_the_model_137_each_but_pool_7():
    # With ff=1 the budget walk takes the whole pool, so the selection *is* the pool.
    pools = [ffid.plan(PRESET, ff=1.0, ffid=i, selector="compat-v2") for i in range(8)]
    assert [len(p) for p in pools] == [137] * 7 + [136]
    names = [set(p) for p in pools]
    assert set().union(*names) == set(ffid.load_manifest(PRESET).names)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not names[i] & names[j]
            assert overlap(pools[i], pools[j]) == 0
    # every pool touches all 40 blocks (the seed's "Perfect 40/40 blocks")
    m = pools[0].manifest
    for p in pools:
        assert len({m.block_of(n) for n in p} - {None}) == 40


@pytest.mark.parametrize("ff", [0.001, 0.01, 0.05, 0.2])
def test_ids_disjoint_at_tensor_level(ff):
    sels = [ffid.plan(PRESET, ff=ff, ffid=i, selector="compat-v2") for i in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not set(sels[i]) & set(sels[j])


def test_overshoot_is_at_most_one_tensor():
    for ff in (0.001, 0.01, 0.05):
        for i in range(8):
            sel = ffid.plan(PRESET, ff=ff, ffid=i, selector="compat-v2")
            assert sel.selected >= sel.target
            largest = max(p.count for p in sel.values())
            assert sel.selected - sel.target < largest


def test_a_target_beyond_the_pool_takes_the_whole_pool():
    # A pool holds about 1/8 of the model: asking for more silently stops at the pool (original quirk).
    sel = ffid.plan(PRESET, ff=0.3, ffid=3, selector="compat-v2")
    assert sel.selected < sel.target
    assert set(sel) == set(ffid.plan(PRESET, ff=1.0, ffid=3, selector="compat-v2"))


@pytest.mark.parametrize("bad", [8, 9, 100])
def test_ids_beyond_the_8_pools_are_an_error(bad):
    with pytest.raises(ConfigError, match=re.escape(f"--ffid {bad} does not exist in compat-v2")):
        ffid.plan(PRESET, ff=0.01, ffid=bad, selector="compat-v2")


def test_ffid_0_is_a_valid_pool():
    sel = ffid.plan(PRESET, ff=0.01, ffid=0, selector="compat-v2")
    assert sel.selected >= sel.target


def test_options_are_rejected():
    with pytest.raises(ConfigError, match="compat-v2 takes no options"):
        ffid.plan(PRESET, ff=0.01, ffid=1, selector="compat-v2", slots=4)


def test_exclude_restricts_which_tensors_are_taken():
    sel = ffid.plan(PRESET, ff=0.01, ffid=2, selector="compat-v2", exclude=["modulation"])
    assert not any("modulation" in n for n in sel)
    assert sel.selected >= sel.target
    full = ffid.plan(PRESET, ff=1.0, ffid=2, selector="compat-v2")
    assert set(sel) <= set(full)  # still drawn from the same pool


def test_works_on_a_tiny_diffusers_wan():
    from tests.tiny_models import tiny_wan

    model = tiny_wan()
    sels = [ffid.plan(model, ff=0.2, ffid=i, selector="compat-v2") for i in range(8)]
    for i in range(8):
        for j in range(i + 1, 8):
            assert not set(sels[i]) & set(sels[j])
