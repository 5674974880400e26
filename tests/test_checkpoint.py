"""Checkpoint format and file handling: delta files, streaming writer, merge/extract, atomic writes.

These tests use a stand-in handle that honours the engine contract (so the format is tested on
its own); tests/test_checkpoint_engine.py repeats the round trips with the real engine.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.tiny_models import tiny_gpt2, tiny_mlp, tiny_wan

import ffid
from ffid.checkpoint import (
    DiskSpaceError,
    apply_delta,
    extract_delta,
    inspect_file,
    load_delta,
    merge_checkpoint,
    save_delta,
    save_full,
    write_safetensors_stream,
)
from ffid.checkpoint.atomic import TEMP_SUFFIX, atomic_write, temp_prefix
from ffid.checkpoint.delta import INDEX_SUFFIX, VALUE_SUFFIX
from ffid.checkpoint.namemap import DIFFUSERS, WAN, detect_naming, map_name
from ffid.dtypes import dtype_code, index_code
from ffid.errors import ConfigError, MismatchError, ModelFileError
from ffid.names import canonical_name
from matrix import CASES, MODELS, SELECTORS

# -- helpers shared with the other checkpoint test files -------------------------------------------


class StandInHandle:
    """The engine contract (selection, trained/base values, effective_state, model), nothing more."""

    def __init__(self, model: torch.nn.Module, selection, seed: int = 0, scale: float = 0.01):
        self.model, self.selection = model, selection
        sd = {canonical_name(k): v for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(seed)
        self._base = {n: sd[n].detach().reshape(-1)[selection.indices(n)].float().clone() for n in selection}
        self._trained = {n: v + scale * torch.randn(v.shape, generator=g) for n, v in self._base.items()}

    def trained_values(self):
        return {n: v.clone() for n, v in self._trained.items()}

    def base_values(self):
        return {n: v.clone() for n, v in self._base.items()}

    def effective_state(self, dtype=None):
        for k, v in self.model.state_dict().items():
            n = canonical_name(k)
            v = v.detach().clone()
            if n in self._trained:
                v.view(-1)[self.selection.indices(n)] = self._trained[n].to(v.dtype)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            yield n, v


def save_state(
    model: torch.nn.Module, path: Path, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Save a model's state dict (ties broken, optionally cast) as one safetensors file."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone().contiguous()
        sd[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    save_file(sd, str(path), metadata={"base": "yes"})
    return sd


def read_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture()
def wan_setup(tmp_path):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    sel = ffid.plan(model, 0.05, 1)
    handle = StandInHandle(model, sel)
    delta = tmp_path / "d1.safetensors"
    save_delta(handle, delta)
    return model, base, handle, delta


# -- format ----------------------------------------------------------------------------------------


def test_index_dtype_is_smallest_fitting_integer():
    assert index_code(1) == "U8"
    assert index_code(256) == "U8"
    assert index_code(257) == "U16"
    assert index_code(65536) == "U16"
    assert index_code(65537) == "U32"
    assert index_code(2**32) == "U32"
    assert index_code(2**32 + 1) == "I64"


@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_delta_round_trips_values_indices_and_metadata(tmp_path, model_key, sel_key):
    model = MODELS[model_key].build()
    case = SELECTORS[sel_key]
    sel = case.plan(model)
    handle = StandInHandle(model, sel)
    path = tmp_path / "d.safetensors"
    size = save_delta(handle, path, metadata={"ss_learning_rate": "0.0001", "ss_steps": 10})
    delta = load_delta(path)
    assert set(delta.tensors) == set(sel)
    trained = handle.trained_values()
    for name, t in delta.tensors.items():
        assert torch.equal(t.indices, sel.indices(name))
        assert t.values.dtype == torch.float32
        assert torch.equal(t.values, trained[name])
    info = delta.info
    assert (info.selector, info.ff, info.ffid) == (case.selector, case.ff, case.ffid)
    assert info.selection_fingerprint == sel.fingerprint
    assert info.base_manifest_fingerprint == sel.manifest.fingerprint
    assert info.selected == sel.selected
    assert delta.metadata["ss_learning_rate"] == "0.0001"
    assert delta.metadata["ss_steps"] == "10"
    assert delta.metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert delta.metadata["modelspec.architecture"].endswith("/ffid-delta")
    assert json.loads(delta.metadata["ss_network_args"])["ffid"] == case.ffid
    # Size bound from the issue: (4 + index bytes) x k + a small header.
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    per_elem = 4 + {"U8": 1, "U16": 2, "U32": 4, "I64": 8}[index_code(max(t.numel for t in sel.manifest))]
    assert size - 8 - header_len <= per_elem * sel.selected
    # The selection rebuilt from the file is the same selection.
    assert delta.selection(sel.manifest).fingerprint != ""
    for name in sel:
        assert torch.equal(delta.selection(sel.manifest).indices(name), sel.indices(name))


def test_delta_file_is_plain_safetensors_with_documented_keys(wan_setup):
    _, _, handle, delta = wan_setup
    sel = handle.selection
    with safe_open(str(delta), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        name = next(iter(sel))
        idx = f.get_tensor(name + INDEX_SUFFIX)
        val = f.get_tensor(name + VALUE_SUFFIX)
    assert keys == {n + s for n in sel for s in (INDEX_SUFFIX, VALUE_SUFFIX)}
    assert not idx.is_floating_point() and val.dtype == torch.float32
    assert meta["ffid.format"] == "ffid-delta" and meta["ffid.format_version"] == "1"
    assert meta["ffid.naming"] == DIFFUSERS
    fp = json.loads(meta["ffid.base_fingerprint"])
    assert set(fp) == set(sel) and fp[name][0] == list(sel[name].shape)


def test_whole_tensor_picks_store_values_without_indices(tmp_path):
    model = tiny_mlp()
    sel = ffid.plan(model, 0.3, 0, "compat-v2")
    whole = [n for n in sel if sel[n].whole]
    assert whole
    path = tmp_path / "d.safetensors"
    save_delta(StandInHandle(model, sel), path)
    with safe_open(str(path), "pt") as f:
        for n in whole:
            assert n + INDEX_SUFFIX not in f.keys()  # noqa: SIM118 - safe_open is not a dict
            assert tuple(f.get_slice(n + VALUE_SUFFIX).get_shape()) == sel[n].shape
    delta = load_delta(path)
    assert all(delta.tensors[n].whole for n in whole)


def test_save_precision_bf16_halves_values(tmp_path):
    model = tiny_wan()
    sel = ffid.plan(model, 0.05, 1)
    handle = StandInHandle(model, sel)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_delta(handle, a)
    save_delta(handle, b, save_dtype="bf16")
    da, db = load_delta(a), load_delta(b)
    assert db.info.value_dtype == "BF16"
    name = next(iter(sel))
    assert torch.equal(db.tensors[name].values, da.tensors[name].values.to(torch.bfloat16))


def test_not_a_delta_and_corrupt_deltas_are_refused(tmp_path, wan_setup):
    _, base, _, delta = wan_setup
    with pytest.raises(ModelFileError, match="not an ffid delta"):
        load_delta(base)
    raw = bytearray(read_bytes(delta))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ModelFileError, match="truncated"):
        load_delta(trunc)


def test_numpy_merge_casts_match_torch_bit_for_bit():
    import numpy as np

    from ffid.checkpoint.stio import from_f32, to_f32

    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-40, 38, (20000,), generator=g).float()
    x = torch.cat(
        [
            torch.randn(20000, generator=g) * scale,
            torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, 3.4e38, 1.00390625, 65520.0, 1e-8]),
        ]
    )
    bf = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(from_f32(x.numpy(), "BF16"), bf)
    assert np.array_equal(
        from_f32(x.numpy(), "F16").view(np.uint16), x.to(torch.float16).numpy().view(np.uint16)
    )
    back = x.to(torch.bfloat16).float().numpy()
    assert np.array_equal(to_f32(bf, "BF16").view(np.uint32), back.view(np.uint32))


# -- streaming writer --------------------------------------------------------------------------------


def test_stream_writer_output_loads_with_safetensors(tmp_path):
    tensors = {
        "a.weight": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.randn(7),
        "c.idx": torch.arange(5, dtype=torch.int64),
        "odd": torch.randn(3).to(torch.float16),
        "empty": torch.zeros(0),
    }
    entries = [(k, dtype_code(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    calls = []

    def produce(key):
        calls.append(key)
        return tensors[key]

    path = tmp_path / "s.safetensors"
    write_safetensors_stream(path, entries, produce, {"x": "y"})
    loaded = load_file(str(path))
    assert set(calls) == set(tensors) and len(calls) == len(tensors)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"x": "y"}
    assert (8 + struct.unpack("<Q", read_bytes(path)[:8])[0]) % 8 == 0


def test_stream_writer_rejects_wrong_sizes_and_leaves_nothing(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(ConfigError):
        write_safetensors_stream(path, [("a", "F32", (4,))], lambda k: torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


# -- merge ------------------------------------------------------------------------------------------


def test_merge_equals_effective_state_and_keeps_layout(tmp_path, wan_setup):
    _, base, handle, delta = wan_setup
    out = tmp_path / "merged.safetensors"
    result = merge_checkpoint(base, [delta], out)
    assert result.elements == handle.selection.selected
    merged = load_file(str(out))
    eff = dict(handle.effective_state())
    assert set(merged) == set(load_file(str(base)))
    for k, v in merged.items():
        assert torch.equal(v, eff[canonical_name(k)]), k
    base_raw, out_raw = read_bytes(base), read_bytes(out)
    n = struct.unpack("<Q", base_raw[:8])[0]
    assert out_raw[: 8 + n] == base_raw[: 8 + n]  # same header: names, dtypes, offsets, metadata
    # save_full writes the same values.
    full = tmp_path / "full.safetensors"
    save_full(handle, full)
    full_sd = load_file(str(full))
    assert all(torch.equal(full_sd[canonical_name(k)], v) for k, v in merged.items())


def test_merge_bf16_base_and_dtype_option(tmp_path):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    sd = save_state(model, base, torch.bfloat16)
    sel = ffid.plan(model.to(torch.bfloat16), 0.05, 2)
    handle = StandInHandle(model, sel)
    delta = tmp_path / "d.safetensors"
    save_delta(handle, delta)
    out = tmp_path / "m.safetensors"
    merge_checkpoint(base, [delta], out)
    merged = load_file(str(out))
    trained = handle.trained_values()
    for name in sel:
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name].reshape(-1)[sel.indices(name)], trained[name].to(torch.bfloat16))
    out32 = tmp_path / "m32.safetensors"
    merge_checkpoint(base, [delta], out32, dtype="fp32")
    m32 = load_file(str(out32))
    for name in sel:
        assert m32[name].dtype == torch.float32
        assert torch.equal(m32[name].reshape(-1)[sel.indices(name)], trained[name])
        untouched = torch.ones(sd[name].numel(), dtype=torch.bool)
        untouched[sel.indices(name)] = False
        assert torch.equal(m32[name].reshape(-1)[untouched], sd[name].reshape(-1)[untouched].float())


def test_partial_delta_copies_untouched_tensors_byte_for_byte(tmp_path, wan_setup):
    model, base, _, _ = wan_setup
    sel = ffid.plan(model, 0.005, 3, include=[r"^blocks\.0\.attn1\."])
    handle = StandInHandle(model, sel)
    delta = tmp_path / "part.safetensors"
    save_delta(handle, delta)
    out = tmp_path / "m.safetensors"
    result = merge_checkpoint(base, [delta], out)
    assert result.tensors == len(sel) < len(model.state_dict())
    merged, base_sd = load_file(str(out)), load_file(str(base))
    eff = dict(handle.effective_state())
    for k, v in merged.items():
        assert torch.equal(v, eff[k])
        if k not in sel:
            assert torch.equal(v, base_sd[k])
    assert out.stat().st_size == base.stat().st_size


def test_multiplier_scales_the_change(tmp_path, wan_setup):
    _, base, handle, delta = wan_setup
    out = tmp_path / "half.safetensors"
    merge_checkpoint(base, [delta], out, multipliers=0.5)
    merged, sel = load_file(str(out)), handle.selection
    b, t = handle.base_values(), handle.trained_values()
    for name in sel:
        assert torch.equal(merged[name].reshape(-1)[sel.indices(name)], b[name] + 0.5 * (t[name] - b[name]))
    zero = tmp_path / "zero.safetensors"
    merge_checkpoint(base, [delta], zero, multipliers=0.0)
    assert read_bytes(zero) == read_bytes(base)


def test_two_ids_merge_in_either_order_identically_and_overlap_is_refused(tmp_path, wan_setup):
    model, base, _, d1 = wan_setup
    d2 = tmp_path / "d2.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 2), seed=5), d2)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge_checkpoint(base, [d1, d2], a)
    merge_checkpoint(base, [d2, d1], b)
    assert read_bytes(a) == read_bytes(b)
    # Same id trained twice: overlapping positions.
    d1b = tmp_path / "d1b.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1), seed=9), d1b)
    with pytest.raises(MismatchError, match="overlap"):
        merge_checkpoint(base, [d1, d1b], tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    result = merge_checkpoint(base, [d1, d1b], tmp_path / "c.safetensors", allow_overlap=True)
    assert result.overlap == ffid.plan(model, 0.05, 1).selected
    merged = load_file(str(tmp_path / "c.safetensors"))
    x, y = load_delta(d1), load_delta(d1b)
    base_sd = load_file(str(base))
    name = next(iter(x.tensors))
    bv = base_sd[name].reshape(-1)[x.tensors[name].indices]
    expect = bv + ((x.tensors[name].values - bv) + (y.tensors[name].values - bv))
    assert torch.allclose(merged[name].reshape(-1)[x.tensors[name].indices], expect, atol=1e-6)


def test_delta_for_another_base_is_refused_naming_the_tensor(tmp_path, wan_setup):
    _, _, _, delta = wan_setup
    other = tmp_path / "other.safetensors"
    save_state(tiny_wan(seed=3), other)
    out = tmp_path / "m.safetensors"
    with pytest.raises(MismatchError, match=r"tensor '[^']+'.*first mismatching tensor"):
        merge_checkpoint(other, [delta], out)
    assert not out.exists()
    merge_checkpoint(other, [delta], out, verify=False)  # explicitly allowed
    gpt = tmp_path / "gpt.safetensors"
    save_state(tiny_gpt2(), gpt)
    with pytest.raises(MismatchError, match="lacks"):
        merge_checkpoint(gpt, [delta], tmp_path / "g.safetensors")


def test_merge_refuses_to_overwrite_inputs_and_corrupt_inputs(tmp_path, wan_setup):
    _, base, _, delta = wan_setup
    before = read_bytes(base)
    with pytest.raises(ConfigError, match="also an input"):
        merge_checkpoint(base, [delta], base)
    with pytest.raises(ConfigError, match="also an input"):
        merge_checkpoint(base, [delta], delta)
    link = tmp_path / "link.safetensors"
    link.symlink_to(base)
    with pytest.raises(ConfigError, match="also an input"):
        merge_checkpoint(base, [delta], link)
    assert read_bytes(base) == before
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(before[:-10])
    out = tmp_path / "out.safetensors"
    with pytest.raises(ModelFileError, match="truncated"):
        merge_checkpoint(trunc, [delta], out)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="corrupt"):
        merge_checkpoint(garbage, [delta], out)
    assert not out.exists()


def test_corrupt_delta_indices_are_refused_and_nothing_is_written(tmp_path, wan_setup):
    _, base, _, delta = wan_setup
    with safe_open(str(delta), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        meta = f.metadata()
    key = next(k for k in sorted(tensors) if k.endswith(INDEX_SUFFIX) and tensors[k].numel() > 93)
    idx = tensors[key].numpy().copy()  # torch has no index_put for uint16
    idx[[1, 2]] = idx[[2, 1]]  # unsorted; entries 1, 2 are not sampled for k > 93
    tensors[key] = torch.from_numpy(idx)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = tmp_path / "m.safetensors"
    with pytest.raises(ModelFileError, match="not sorted"):
        merge_checkpoint(base, [bad], out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_full_disk_is_refused_before_writing(tmp_path, wan_setup, monkeypatch):
    import shutil
    from collections import namedtuple

    _, base, _, delta = wan_setup
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "m.safetensors"
    with pytest.raises(DiskSpaceError, match="free"):
        merge_checkpoint(base, [delta], out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_sharded_base_keeps_shards_and_index(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    index = tmp_path / "base" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.exists()
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    sel = ffid.plan(model, 0.05, 1)
    handle = StandInHandle(model, sel)
    save_delta(handle, tmp_path / "d.safetensors")
    out = tmp_path / "merged"
    other = tmp_path / "d_other.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1), seed=7), other)
    with pytest.raises(MismatchError, match="overlap"):
        merge_checkpoint(tmp_path / "base", [tmp_path / "d.safetensors", other], out)
    assert not out.exists()  # refused before the output folder is even created
    result = merge_checkpoint(tmp_path / "base", [tmp_path / "d.safetensors"], out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / index.name).read_text()) == json.loads(index.read_text())
    assert result.outputs[0] == out / index.name
    eff = dict(handle.effective_state())
    for shard in shards:
        for k, v in load_file(str(out / shard)).items():
            assert torch.equal(v, eff[k])
    # With the config next to it, the merged folder loads as a model.
    import shutil

    from diffusers import WanTransformer3DModel

    shutil.copy(tmp_path / "base" / "config.json", out / "config.json")
    loaded = WanTransformer3DModel.from_pretrained(out)
    assert all(torch.equal(v, eff[k]) for k, v in loaded.state_dict().items())


# -- extract ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extract_then_merge_is_bit_exact(tmp_path, dtype):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    sd = save_state(model, base, dtype)
    tuned_sd = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(0)
    for v in tuned_sd.values():
        flat = v.view(-1)
        pos = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 50)]
        flat[pos] = (flat[pos].float() + torch.randn(pos.numel(), generator=g)).to(v.dtype)
    name = next(iter(tuned_sd))
    tuned_sd[name].view(-1)[0] = -0.0 if float(sd[name].view(-1)[0]) == 0.0 else tuned_sd[name].view(-1)[0]
    tuned = tmp_path / "tuned.safetensors"
    save_file(tuned_sd, str(tuned), metadata={"base": "yes"})
    delta = tmp_path / "x.safetensors"
    result = extract_delta(base, tuned, delta)
    assert result.elements == result.differing > 0
    out = tmp_path / "back.safetensors"
    merge_checkpoint(base, [delta], out)
    assert read_bytes(out) == read_bytes(tuned)
    # A threshold keeps fewer positions.
    small = tmp_path / "t.safetensors"
    r2 = extract_delta(base, tuned, small, threshold=0.5)
    assert 0 < r2.elements < result.elements


def test_extract_with_selection_matches_save_delta_and_flags_changes_outside(tmp_path, wan_setup):
    _, base, handle, delta = wan_setup
    tuned = tmp_path / "tuned.safetensors"
    merge_checkpoint(base, [delta], tuned)
    sel = ffid.plan(base, 0.05, 1)
    out = tmp_path / "x.safetensors"
    extract_delta(base, tuned, out, selection=sel)
    a, b = load_delta(out), load_delta(delta)
    assert a.info.selection_fingerprint == b.info.selection_fingerprint
    for n in b.tensors:
        assert torch.equal(a.tensors[n].indices, b.tensors[n].indices)
        assert torch.equal(a.tensors[n].values, b.tensors[n].values)
    assert a.info.base_fingerprint == b.info.base_fingerprint
    wrong = ffid.plan(base, 0.05, 2)
    with pytest.raises(MismatchError, match="outside the selection"):
        extract_delta(base, tuned, tmp_path / "y.safetensors", selection=wrong)
    assert not (tmp_path / "y.safetensors").exists()
    r = extract_delta(base, tuned, tmp_path / "y.safetensors", selection=wrong, outside="warn")
    assert r.outside == handle.selection.selected - _unchanged(handle) and r.warnings


def _unchanged(handle) -> int:
    b, t = handle.base_values(), handle.trained_values()
    return sum(int((b[n] == t[n]).sum()) for n in b)


def test_extract_refuses_different_models(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_state(tiny_wan(), a)
    save_state(tiny_wan(layers=3), b)
    with pytest.raises(MismatchError, match=r"lacks|missing"):
        extract_delta(a, b, tmp_path / "x.safetensors")


# -- apply_delta ------------------------------------------------------------------------------------


def test_apply_delta_in_place_verifies_base(wan_setup):
    _, _, handle, delta = wan_setup
    target = tiny_wan()
    result = apply_delta(target, delta)
    assert result.elements == handle.selection.selected
    eff = dict(handle.effective_state())
    assert all(torch.equal(v, eff[k]) for k, v in target.state_dict().items())
    with pytest.raises(MismatchError, match="already applied"):
        apply_delta(target, delta)
    other = tiny_wan(seed=4)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MismatchError, match="first mismatching tensor"):
        apply_delta(other, str(delta))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # all or nothing


# -- Wan <-> diffusers names ------------------------------------------------------------------------


def _diffusers_to_wan(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {map_name(k, DIFFUSERS, WAN): v for k, v in sd.items()}


def test_name_map_inverts_the_diffusers_conversion():
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = tiny_wan().state_dict()
    wan_sd = _diffusers_to_wan(sd)
    assert detect_naming(wan_sd) == WAN and detect_naming(sd) == DIFFUSERS
    assert "blocks.0.self_attn.q.weight" in wan_sd and "head.modulation" in wan_sd
    assert "blocks.0.norm3.weight" in wan_sd and "blocks.0.ffn.0.weight" in wan_sd
    back = convert_wan_transformer_to_diffusers({"model.diffusion_model." + k: v for k, v in wan_sd.items()})
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)
    assert all(map_name(map_name(k, DIFFUSERS, WAN), WAN, DIFFUSERS) == k for k in sd)


def test_delta_trained_in_diffusers_naming_merges_into_original_naming(tmp_path, wan_setup):
    model, _, handle, delta = wan_setup
    wan_file = tmp_path / "wan.safetensors"
    wan_sd = {
        "model.diffusion_model." + k: v.clone().contiguous()
        for k, v in _diffusers_to_wan(model.state_dict()).items()
    }
    save_file(wan_sd, str(wan_file))
    out = tmp_path / "wan_merged.safetensors"
    result = merge_checkpoint(wan_file, [delta], out)
    assert result.renamed and "blocks.0.attn1.to_q.weight" in result.renamed
    merged = load_file(str(out))
    assert set(merged) == set(wan_sd)  # original names, prefix included
    eff = dict(handle.effective_state())
    for k, v in merged.items():
        assert torch.equal(v, eff[map_name(canonical_name(k), WAN, DIFFUSERS)]), k
    # And back: a delta extracted in Wan naming applies to the diffusers model.
    x = tmp_path / "x.safetensors"
    extract_delta(wan_file, out, x)
    assert load_delta(x).info.naming == WAN
    target = tiny_wan()
    apply_delta(target, x)
    assert all(torch.equal(v, eff[k]) for k, v in target.state_dict().items())


# -- inspect ----------------------------------------------------------------------------------------


def test_inspect_delta_and_checkpoint(wan_setup):
    _, base, handle, delta = wan_setup
    d = inspect_file(delta)
    assert d["kind"] == "delta" and d["ffid"] == 1 and d["ff"] == 0.05 and d["selector"] == "spread"
    assert d["selected"] == handle.selection.selected
    assert sum(d["per_block"].values()) == d["selected"] and "00" in d["per_block"]
    c = inspect_file(base)
    assert c["kind"] == "checkpoint" and c["tensors"] == len(tiny_wan().state_dict())
    assert c["blocks"] == 2 and c["metadata"] == {"base": "yes"} and c["naming"] == DIFFUSERS


# -- atomic writes ----------------------------------------------------------------------------------


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    from ffid.checkpoint import write_safetensors_stream
    entries = [(f"t{i}", "F32", (1024, 256)) for i in range(64)]
    def produce(key):
        if key == "t3":
            print("writing", flush=True)
            time.sleep(60)
        return torch.full((1024, 256), float(key[1:]))
    write_safetensors_stream(sys.argv[1], entries, produce)
    """
)


def test_sigkill_mid_write_leaves_old_file_and_next_run_cleans_up(tmp_path):
    target = tmp_path / "model.safetensors"
    save_file({"old": torch.ones(3)}, str(target))
    old = read_bytes(target)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        deadline = time.time() + 10
        while time.time() < deadline:
            temps = list(tmp_path.glob(temp_prefix(target, proc.pid) + "*" + TEMP_SUFFIX))
            temp = temps[0] if temps else tmp_path / "none"
            if temp.exists() and temp.stat().st_size > 0:
                break
            time.sleep(0.05)
        assert temp.exists() and temp.stat().st_size > 0  # killed really mid-way
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert read_bytes(target) == old
    assert temp.exists()  # SIGKILL leaves the temp behind ...
    write_safetensors_stream(target, [("new", "F32", (2,))], lambda k: torch.zeros(2))
    assert not temp.exists()  # ... and the next write to the same target removes it
    assert set(load_file(str(target))) == {"new"}
