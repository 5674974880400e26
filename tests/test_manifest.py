"""Manifests from modules (meta too), safetensors files, sharded indexes, model folders, presets.

Only headers may be read: a checkpoint whose header describes 28 GB of data (a sparse file) must
plan without reading that data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_mlp, tiny_wan

import ffid
from ffid.dtypes import DTYPE_BYTES
from ffid.errors import ConfigError, MissingFileError, ModelFileError
from ffid.manifest import (
    Manifest,
    TensorInfo,
    manifest_from_module,
    read_safetensors_header,
)
from ffid.models import load_manifest
from matrix import MODELS


def shapes(m: Manifest) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in m}


def write_fake_checkpoint(path: Path, manifest: Manifest, prefix: str = "") -> int:
    """A safetensors file with ``manifest``'s header and a sparse (unwritten) data section."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in manifest:
        size = t.numel * DTYPE_BYTES[t.dtype]
        entry = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        header[prefix + t.name] = entry
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # sparse: no data block is written
    return offset


def bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# -- modules ---------------------------------------------------------------------------------------
def test_module_manifest_lists_tied_weights_once():
    model = tiny_gpt2()
    m = manifest_from_module(model)
    assert "transformer.wte.weight" in m and "lm_head.weight" not in m  # tied to wte
    assert m.total_params == sum(p.numel() for p in model.parameters())
    assert all(t.dtype == "F32" for t in m)


@pytest.mark.parametrize("model_key", MODELS)
def test_meta_module_gives_the_same_manifest(model_key):
    factory = MODELS[model_key].build
    with torch.device("meta"):
        meta_model = factory()
    assert next(meta_model.parameters()).is_meta
    assert shapes(manifest_from_module(meta_model)) == shapes(manifest_from_module(factory()))
    a = ffid.plan(meta_model, ff=0.05, ffid=1)
    assert a.fingerprint == ffid.plan(factory(), ff=0.05, ffid=1).fingerprint


def test_module_without_float_parameters_is_an_error():
    with pytest.raises(ConfigError, match="no floating-point parameters"):
        manifest_from_module(torch.nn.ReLU())


def test_integer_tensors_are_not_trainable(tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file({"w": torch.zeros(4, 4), "position_ids": torch.arange(8)}, str(path))
    assert load_manifest(path).names == ["w"]


# -- files, indexes, folders -----------------------------------------------------------------------
def test_safetensors_file_equals_module(tmp_path):
    model = tiny_mlp()
    path = tmp_path / "mlp.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}, str(path))
    m = load_manifest(path)
    assert shapes(m) == shapes(manifest_from_module(model))
    assert m["conv.weight"].source_name == "model.diffusion_model.conv.weight"
    assert m["conv.weight"].file == "mlp.safetensors"
    assert m.metadata == {}
    assert ffid.plan(path, ff=0.03, ffid=4).fingerprint == ffid.plan(model, ff=0.03, ffid=4).fingerprint


def test_transformers_folder_and_sharded_index(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama", max_shard_size="20KB", safe_serialization=True)
    folder = tmp_path / "llama"
    index = folder / "model.safetensors.index.json"
    assert index.exists() and len(list(folder.glob("*.safetensors"))) > 1  # really sharded
    expected = shapes(manifest_from_module(model))
    assert shapes(load_manifest(folder)) == expected
    assert shapes(load_manifest(index)) == expected
    assert {t.file for t in load_manifest(index)} == {p.name for p in folder.glob("*.safetensors")}
    assert ffid.plan(folder, ff=0.02, ffid=7).fingerprint == ffid.plan(model, ff=0.02, ffid=7).fingerprint


def test_single_file_transformers_folder(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    assert shapes(load_manifest(tmp_path / "gpt2")) == shapes(manifest_from_module(model))


def test_diffusers_model_and_pipeline_folders(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    expected = shapes(manifest_from_module(model))
    assert shapes(load_manifest(tmp_path / "pipe" / "transformer")) == expected
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    (tmp_path / "pipe" / "vae").mkdir()
    assert shapes(load_manifest(tmp_path / "pipe")) == expected  # the pipeline's transformer is used


def test_folder_errors(tmp_path):
    with pytest.raises(ModelFileError, match=r"holds no \.safetensors"):
        load_manifest(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ModelFileError, match="several checkpoints"):
        load_manifest(tmp_path)


def test_index_errors(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "missing.safetensors"}}))
    with pytest.raises(MissingFileError, match=r"missing\.safetensors"):
        load_manifest(index)
    index.write_text("{not json")
    with pytest.raises(ModelFileError, match="not a valid safetensors index"):
        load_manifest(index)


# -- bad files -------------------------------------------------------------------------------------
def _header_file(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def test_bad_files(tmp_path):
    with pytest.raises(MissingFileError, match=r"nope\.safetensors"):
        load_manifest(tmp_path / "nope.safetensors")
    (tmp_path / "text.safetensors").write_text("this is a text file, not a checkpoint at all")
    with pytest.raises(ModelFileError, match="not a safetensors file or is truncated"):
        load_manifest(tmp_path / "text.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelFileError, match="too short"):
        load_manifest(tmp_path / "short.safetensors")
    ok = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(ModelFileError, match="truncated"):  # header cut
        load_manifest(_header_file(tmp_path / "cut.safetensors", ok[:20], length=len(ok)))
    with pytest.raises(ModelFileError, match="corrupt safetensors header"):
        load_manifest(_header_file(tmp_path / "garbage.safetensors", b"{\xff\xfe garbage}" + b" " * 16))
    with pytest.raises(ModelFileError, match="truncated: its header describes 16 bytes"):  # data cut
        load_manifest(_header_file(tmp_path / "data.safetensors", ok, b"\0" * 8))
    bad_entry = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    with pytest.raises(ModelFileError, match="'w' is malformed"):
        load_manifest(_header_file(tmp_path / "entry.safetensors", bad_entry, b"\0" * 16))
    ints = json.dumps({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}).encode()
    with pytest.raises(ModelFileError, match="no floating-point tensors"):
        load_manifest(_header_file(tmp_path / "ints.safetensors", ints, b"\0" * 16))
    with pytest.raises(ConfigError, match="cannot read a model from a int"):
        load_manifest(42)


def test_names_that_collide_after_normalisation_are_an_error(tmp_path):
    path = tmp_path / "dup.safetensors"
    save_file({"w": torch.zeros(2), "module.w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="normalise to the same name 'w'"):
        load_manifest(path)


# -- header-only reads -----------------------------------------------------------------------------
def test_a_28_gb_checkpoint_plans_from_its_header_only(tmp_path):
    preset = load_manifest("wan2.2-t2v-14b")
    path = tmp_path / "wan2.2_t2v_low_noise_14B_fp16.safetensors"
    data = write_fake_checkpoint(path, preset, prefix="model.diffusion_model.")
    assert data == 2 * 14_288_491_584 and path.stat().st_size > 28e9
    before = bytes_read()
    entries, _, start = read_safetensors_header(path)
    sel = ffid.plan(path, ff=0.01, ffid=1)
    spent = bytes_read() - before
    assert spent < 2 * start + (1 << 20)  # the header twice (header check + plan), never the data
    assert shapes(sel.manifest) == shapes(preset)
    assert sel.fingerprint == ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=1).fingerprint
    assert len(entries) == 1095


# -- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("preset", "tensors", "params", "per_block"),
    [
        ("wan2.1-t2v-1.3b", 825, 1_418_996_800, 46_440_704),
        ("wan2.2-ti2v-5b", 825, 4_999_787_712, 163_656_704),
        ("wan2.2-t2v-14b", 1095, 14_288_491_584, 351_394_304),
        ("wan2.1-t2v-14b", 1095, 14_288_491_584, 351_394_304),
    ],
)
def test_presets_have_the_reference_shapes(preset, tensors, params, per_block):
    m = load_manifest(preset)
    assert (len(m), m.total_params) == (tensors, params)
    for b in m.blocks():
        members = [t for t in m if m.block_of(t.name) == b]
        assert len(members) == 27 and sum(t.numel for t in members) == per_block
    assert m["blocks.0.modulation"].shape[:2] == (1, 6)


def test_manifest_fingerprint_ignores_dtype_but_not_shapes():
    a = Manifest([TensorInfo("w", (4, 4), "F32", "w")])
    b = Manifest([TensorInfo("w", (4, 4), "BF16", "w")])
    c = Manifest([TensorInfo("w", (4, 5), "F32", "w")])
    assert a.fingerprint == b.fingerprint != c.fingerprint
