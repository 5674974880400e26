"""Invariants of the spread selector over presets and tiny diffusers/transformers models.

Exact totals, coverage, disjointness across ids (O(1) overlap *and* brute force), nesting,
determinism in a fresh process, evenness inside tensors and O(k) memory.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import torch
from tests.tiny_models import tiny_mlp

import ffid
from ffid.errors import CapacityError, ConfigError
from ffid.manifest import Manifest, TensorInfo, manifest_from_module
from ffid.select.spread import DEFAULT_SLOTS, apportion, matrix_view, spread_capacity
from ffid.selection import overlap
from matrix import MODELS

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["wan2.1-t2v-1.3b", "wan2.2-ti2v-5b", "wan2.2-t2v-14b"]
TINY = {name: spec.build for name, spec in MODELS.items()}  # the matrix models
# Measured column evenness (docs/selectors.md): max - min elements per column <= 7 over the Wan
# shapes at ff 0.001 .. 1/16; tiny models stay within this too.
COLUMN_SPREAD = 8


@pytest.fixture(scope="module")
def tiny_manifests() -> dict[str, Manifest]:
    return {name: manifest_from_module(make()) for name, make in TINY.items()}


def expected_total(ff: float, n: int) -> int:
    """round(ff * N), halves up, computed independently of the library (exact decimal arithmetic)."""
    return int((Decimal(ff) * n).to_integral_value(rounding=ROUND_HALF_UP))


def all_indices(sel) -> dict[str, torch.Tensor]:
    return {name: sel.indices(name) for name in sel}


# -- totals and coverage ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("ff", [1e-6, 0.001, 0.01, 0.0625])
def test_exact_totals_and_full_coverage_on_presets(preset, ff):
    sel = ffid.plan(preset, ff=ff, ffid=1)
    m = sel.manifest
    assert sel.target == expected_total(ff, m.total_params)
    assert sel.selected == sel.target
    assert sum(p.count for p in sel.values()) == sel.selected
    if sel.target >= len(m):
        assert set(sel) == set(m.names)  # every tensor gets elements
    for p in sel.values():
        assert 1 <= p.count <= p.numel


def test_tiny_budget_smaller_than_tensor_count_takes_one_element_per_tensor(tiny_manifests):
    m = tiny_manifests["llama"]
    ff = 5 / m.total_params  # 5 elements, fewer than the tensors
    sel = ffid.plan(m, ff=ff, ffid=0)
    assert sel.selected == 5 and len(sel) == 5
    assert all(p.count == 1 for p in sel.values())


@pytest.mark.parametrize("model", list(TINY))
@pytest.mark.parametrize("ff", [0.003, 0.01, 0.05])
def test_exact_totals_on_tiny_models(tiny_manifests, model, ff):
    m = tiny_manifests[model]
    sel = ffid.plan(m, ff=ff, ffid=3)
    assert sel.selected == expected_total(ff, m.total_params)
    if sel.selected >= len(m):
        assert set(sel) == set(m.names)
    for name in sel:
        idx = sel.indices(name)
        assert idx.dtype == torch.int64 and idx.numel() == sel[name].count
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
        assert int(idx.min()) >= 0 and int(idx.max()) < sel[name].numel


def test_shares_are_one_plus_a_rounded_common_rate():
    # Seat 0 of every tensor, then Sainte-Lague seats: there is one rate theta with
    # count_t = 1 + round(n_t * theta) for every tensor (ties either way), i.e. each tensor is
    # within half an element of its proportional share of what is left after coverage.
    for preset in PRESETS:
        for ff in (0.0001, 0.01, 0.05):
            sel = ffid.plan(preset, ff=ff, ffid=2)
            lo = max((sel[t.name].count - 1.5) / t.numel for t in sel.manifest)
            hi = min((sel[t.name].count - 0.5) / t.numel for t in sel.manifest)
            assert lo <= hi * (1 + 1e-12), (preset, ff)


# -- disjointness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_ids_1_to_8_disjoint_on_presets(preset):
    for ff in (0.001, 0.01, 0.05):
        sels = [ffid.plan(preset, ff=ff, ffid=i) for i in range(1, 9)]
        for i in range(8):
            for j in range(i + 1, 8):
                assert overlap(sels[i], sels[j]) == 0
    # ids with *different* fractions are disjoint too
    assert overlap(ffid.plan(preset, ff=0.06, ffid=4), ffid.plan(preset, ff=0.001, ffid=5)) == 0


@pytest.mark.parametrize("model", list(TINY))
def test_ids_1_to_8_disjoint_by_brute_force(tiny_manifests, model):
    m = tiny_manifests[model]
    for ff in (0.01, 0.03, 0.06):  # 0.06: near the ~1/16 an id holds (a bit less on tiny tensors)
        sels = [ffid.plan(m, ff=ff, ffid=i) for i in range(1, 9)]
        for t in m:
            picked = [s.indices(t.name) for s in sels if t.name in s]
            if picked:
                joined = torch.cat(picked)
                assert joined.unique().numel() == joined.numel(), (model, ff, t.name)
        for i in range(8):  # the O(1) overlap agrees with brute force (0)
            for j in range(i + 1, 8):
                assert overlap(sels[i], sels[j]) == 0
    # mixed fractions, all 16 ids at once, every id full: still no shared element
    sels = [ffid.plan(m, ff=0.06 if i % 2 else 0.01, ffid=i) for i in range(DEFAULT_SLOTS)]
    for t in m:
        joined = torch.cat([s.indices(t.name) for s in sels if t.name in s])
        assert joined.unique().numel() == joined.numel()


def test_all_ids_at_full_capacity_tile_every_tensor(tiny_manifests):
    m = tiny_manifests["gpt2"]
    slots = 4
    sels = []
    for i in range(slots):
        cap = spread_capacity(m, m.names, i, slots)
        sels.append(ffid.plan(m, ff=cap / m.total_params, ffid=i, slots=slots))
        assert sels[-1].selected == cap
    for t in m:
        joined = torch.cat([s.indices(t.name) for s in sels if t.name in s]).sort().values
        assert torch.equal(joined, torch.arange(t.numel))  # a partition of the tensor


def test_o1_overlap_detects_shared_elements(tiny_manifests):
    m = tiny_manifests["mlp"]
    a = ffid.plan(m, ff=0.05, ffid=1)
    b = ffid.plan(m, ff=0.02, ffid=1)
    assert overlap(a, b) == b.selected  # same id: b nested in a
    c = ffid.plan(m, ff=0.05, ffid=1, seed=7)  # other layout: compared by brute force
    brute = sum(int(torch.isin(a.indices(n), c.indices(n)).sum()) for n in a if n in c)
    assert overlap(a, c) == brute


# -- nesting ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(TINY))
def test_larger_ff_contains_smaller_per_tensor(tiny_manifests, model):
    m = tiny_manifests[model]
    fracs = [0.002, 0.01, 0.011, 0.03, 0.06]
    sels = [ffid.plan(m, ff=f, ffid=5) for f in fracs]
    for small, large in itertools.pairwise(sels):
        for name in small:
            assert name in large
            assert bool(torch.isin(small.indices(name), large.indices(name)).all())


@pytest.mark.parametrize("preset", PRESETS)
def test_nesting_counts_on_presets(preset):
    sels = [ffid.plan(preset, ff=f, ffid=2) for f in (0.0001, 0.001, 0.0013, 0.01, 0.05)]
    for small, large in itertools.pairwise(sels):
        for name, pick in small.items():
            # same rank block in the same layout, more ranks: a superset (ranks are a prefix)
            assert large[name].count >= pick.count
            assert large[name].source == pick.source
    # and materialised, on the small tensors of the model
    small, large = sels[1], sels[3]
    for name, pick in small.items():
        if pick.numel <= 100_000:
            assert bool(torch.isin(small.indices(name), large.indices(name)).all())


def test_apportion_is_monotone_in_k():
    sizes = [5, 7, 1000, 3, 64, 64, 1, 250]
    caps = [s // 2 for s in sizes]
    prev = [0] * len(sizes)
    for k in range(sum(caps) + 1):
        counts = apportion(sizes, caps, k)
        assert sum(counts) == k
        assert all(c <= cap for c, cap in zip(counts, caps, strict=True))
        assert all(a >= b for a, b in zip(counts, prev, strict=True))  # no Alabama paradox
        prev = counts


# -- determinism -----------------------------------------------------------------------------------
FRESH = textwrap.dedent(
    """
    import hashlib, json, ffid
    from tests.tiny_models import tiny_mlp
    out = {}
    for name, model in (("mlp", tiny_mlp()),):
        sel = ffid.plan(model, ff=0.03, ffid=6)
        h = hashlib.sha256()
        for n in sel:
            h.update(n.encode()); h.update(sel.indices(n).numpy().tobytes())
        out[name] = [sel.fingerprint, h.hexdigest()]
    for preset in ("wan2.1-t2v-1.3b", "wan2.2-t2v-14b"):
        sel = ffid.plan(preset, ff=0.01, ffid=1)
        h = hashlib.sha256(sel.indices("blocks.7.self_attn.q.bias").numpy().tobytes())
        out[preset] = [sel.fingerprint, h.hexdigest()]
    print(json.dumps(out))
    """
)


def test_same_result_in_a_fresh_process():
    import hashlib

    expected = {}
    for name, model in (("mlp", tiny_mlp()),):  # torch-only model: the subprocess stays quick
        sel = ffid.plan(model, ff=0.03, ffid=6)
        h = hashlib.sha256()
        for n in sel:
            h.update(n.encode())
            h.update(sel.indices(n).numpy().tobytes())
        expected[name] = [sel.fingerprint, h.hexdigest()]
    for preset in ("wan2.1-t2v-1.3b", "wan2.2-t2v-14b"):
        sel = ffid.plan(preset, ff=0.01, ffid=1)
        h = hashlib.sha256(sel.indices("blocks.7.self_attn.q.bias").numpy().tobytes())
        expected[preset] = [sel.fingerprint, h.hexdigest()]
    # another hash seed and a reseeded torch RNG: neither may change anything
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = "import torch; torch.manual_seed(999)\n" + FRESH
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(res.stdout) == expected


def test_fingerprint_changes_with_id_ff_and_seed():
    fps = {
        ffid.plan("wan2.1-t2v-1.3b", ff=ff, ffid=i, seed=seed).fingerprint
        for ff in (0.001, 0.002)
        for i in (0, 1)
        for seed in (0, 1)
    }
    assert len(fps) == 8


# -- evenness --------------------------------------------------------------------------------------
def _row_col_counts(idx: torch.Tensor, shape: tuple[int, ...]):
    rows, cols = matrix_view(shape)
    return torch.bincount(idx // cols, minlength=rows), torch.bincount(idx % cols, minlength=cols)


@pytest.mark.parametrize("model", list(TINY))
def test_rows_differ_by_at_most_one_and_columns_by_a_few(tiny_manifests, model):
    m = tiny_manifests[model]
    for ff in (0.01, 0.05, 0.06):
        sel = ffid.plan(m, ff=ff, ffid=9)
        for name, pick in sel.items():
            if len(pick.shape) != 2 or min(pick.shape) == 1:
                continue
            rows, cols = _row_col_counts(pick.indices(), pick.shape)
            assert int(rows.max() - rows.min()) <= 1, (name, ff)
            assert int(cols.max() - cols.min()) <= COLUMN_SPREAD, (name, ff)


def test_evenness_on_wan_14b_matrices():
    sel = ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=3)
    for name in ("blocks.0.self_attn.q.weight", "blocks.5.ffn.2.weight", "head.head.weight"):
        pick = sel[name]
        rows, cols = _row_col_counts(pick.indices(), pick.shape)
        assert int(rows.max() - rows.min()) <= 1
        assert int(cols.max() - cols.min()) <= COLUMN_SPREAD
    # attention heads (40 x 128 rows of q) get equal shares within one row's worth
    q = sel["blocks.0.self_attn.q.weight"]
    heads = torch.bincount(q.indices() // 5120 // 128, minlength=40)
    assert int(heads.max() - heads.min()) <= 128


def test_rows_of_modulation_and_vectors_are_spread():
    sel = ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=0)
    mod = sel["blocks.3.modulation"]  # [1, 6, 5120]: 6 modulation vectors share evenly
    rows, _ = _row_col_counts(mod.indices(), mod.shape)
    assert rows.numel() == 6 and int(rows.max() - rows.min()) <= 1
    bias = sel["blocks.3.ffn.0.bias"]  # 1-D: spread over the whole range, not a prefix
    idx = bias.indices()
    gaps = idx[1:] - idx[:-1]
    assert int(gaps.max()) <= 3 * bias.numel // bias.count


# -- errors ----------------------------------------------------------------------------------------
def test_capacity_error_says_what_fits():
    with pytest.raises(CapacityError) as info:
        ffid.plan("wan2.2-t2v-14b", ff=0.1, ffid=1)
    msg = str(info.value)
    assert "\n" not in msg
    assert "holds 893,030,724" in msg and "lower --ff to at most 0.0625" in msg and "--slots 9" in msg
    # the advice works
    fitted = ffid.plan("wan2.2-t2v-14b", ff=0.1, ffid=1, slots=9)
    assert fitted.selected == expected_total(0.1, 14_288_491_584)
    assert ffid.plan("wan2.2-t2v-14b", ff=0.0625, ffid=1).selected > 0


def test_ffid_outside_the_layout_and_bad_slots():
    with pytest.raises(ConfigError, match=r"outside the layout's ids 0\.\.15"):
        ffid.plan("wan2.1-t2v-1.3b", ff=0.01, ffid=16)
    with pytest.raises(ConfigError, match="--slots"):
        ffid.plan("wan2.1-t2v-1.3b", ff=0.01, ffid=0, slots=0)
    assert ffid.plan("wan2.1-t2v-1.3b", ff=0.01, ffid=31, slots=32).selected > 0


def test_one_element_tensors_and_scalars():
    m = Manifest([TensorInfo("a", (1,), "F32", "a"), TensorInfo("b", (), "F32", "b"),
                  TensorInfo("c", (40, 8), "F32", "c")])
    sel = ffid.plan(m, ff=1.0, ffid=0, slots=1)
    assert sel.selected == m.total_params
    assert torch.equal(sel.indices("c"), torch.arange(320))
    assert sel.indices("a").tolist() == [0] and sel.indices("b").tolist() == [0]


# -- O(k) memory -----------------------------------------------------------------------------------
MEMORY = textwrap.dedent(
    """
    import json, resource, sys, ffid
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sel = ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=1)
    sel["blocks.0.norm3.bias"].indices()  # warm up torch's kernels
    base = peak()
    n = int(sys.argv[1])
    picks = sorted(sel.values(), key=lambda p: -p.count)[:n]
    kept = [p.indices() for p in picks]  # all kept alive, as an engine would
    k = sum(p.count for p in picks)
    print(json.dumps({"k": k, "grew": peak() - base, "numel": sum(p.numel for p in picks)}))
    """
)


def _memory_run(n: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", MEMORY, str(n)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout)


def test_indices_of_the_largest_14b_tensors_cost_o_k_memory():
    r = _memory_run(4)  # the 4 largest picks of ff 0.01 (time_projection / ffn matrices)
    assert r["grew"] <= 3 * 8 * r["k"] + (16 << 20)
    assert r["grew"] < 8 * r["numel"] / 20  # an O(numel) permutation would be 20x more


@pytest.mark.slow
def test_all_indices_of_ff_001_of_14b_cost_o_k_memory():
    r = _memory_run(10**6)  # every tensor: 142,884,916 indices
    assert r["k"] == expected_total(0.01, 14_288_491_584)
    assert r["grew"] <= 3 * 8 * r["k"]
