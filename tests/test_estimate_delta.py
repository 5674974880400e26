"""The delta file size the estimate reports comes from the delta writer's own layout
(``ffid.checkpoint.delta.delta_file_size``) and equals the size of the file really written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_wan

import ffid
from ffid.checkpoint.delta import (
    DeltaTensor,
    TensorFingerprint,
    delta_file_size,
    write_delta,
)
from ffid.checkpoint.namemap import detect_naming
from ffid.errors import ConfigError
from ffid.estimate import delta_file_bytes, estimate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("factory", "ff", "fid", "selector", "save_dtype", "metadata"),
    [
        (tiny_wan, 0.01, 0, "spread", "fp32", None),
        (tiny_wan, 0.1, 1, "compat-v2", "fp32", None),  # whole tensors: values only
        (tiny_gpt2, 0.05, 3, "spread", "bf16", {"ss_learning_rate": "1e-4", "ffid.prompts": ["a", "b"]}),
        (tiny_llama, 0.06, 2, "spread", "fp16", {"note": "x" * 300}),
    ],
)
def test_size_equals_the_written_file(tmp_path, factory, ff, fid, selector, save_dtype, metadata):
    model = factory()
    sel = ffid.plan(model, ff, fid, selector)
    handle = ffid.attach(model, sel)
    path = tmp_path / "char1-step00000100.safetensors"
    written = handle.save_delta(path, metadata=metadata, save_dtype=save_dtype)
    assert written == path.stat().st_size
    code = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[save_dtype]
    predicted = delta_file_size(
        sel, title=path.stem, architecture=type(model).__name__, metadata=metadata, value_code=code
    )
    assert predicted == written
    handle.detach()


def test_size_equals_the_written_file_for_a_preset():
    # a real model's layout: 825 tensors, u16 and u32 indices, the preset named in the metadata
    import tempfile
    from pathlib import Path

    sel = ffid.plan("wan2.1-t2v-1.3b", 0.00002, 5)
    tensors = [DeltaTensor(n, p.shape, sel.indices(n), torch.zeros(p.count)) for n, p in sel.items()]
    fps = {n: TensorFingerprint(p.shape, "0123456789abcdef") for n, p in sel.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ffid.safetensors"
        written = write_delta(
            path,
            tensors,
            selector=sel.selector,
            params=sel.params,
            selection_fingerprint=sel.fingerprint,
            base_fingerprint=fps,
            base_manifest_fingerprint=sel.manifest.fingerprint,
            naming=detect_naming(sel.manifest.names),
            total_params=sel.total_params,
            source="train",
        )
        assert written == path.stat().st_size
    assert delta_file_size(sel, title="ffid") == written
    assert delta_file_bytes(sel) == written  # what `ffid estimate` reports
    assert estimate("wan2.1-t2v-1.3b", 0.00002, ffid=5)[0].delta_file_bytes == written


def test_bad_value_code_is_refused():
    with pytest.raises(ConfigError, match="F8_E4M3"):
        delta_file_size(ffid.plan(tiny_wan(), 0.01, 0), value_code="F8_E4M3")


def test_the_size_needs_no_torch():
    code = (
        "import sys, ffid; from ffid.checkpoint.delta import delta_file_size; "
        "n = delta_file_size(ffid.plan('wan2.2-t2v-14b', 0.001, 0)); "
        "assert 'torch' not in sys.modules; print(n)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0.001 * 14_288_491_584 * 4


def test_stored_text_encodings_are_counted_when_captions_are_given(tmp_path):
    """A Wan run's deltas store their captions' encodings (bf16, [tokens, text width]):
    ``captions``/``caption_tokens`` add exactly their data to the estimate, the first 64 only,
    and the file really written grows by that plus a few header bytes."""
    from ffid.checkpoint.delta_text import text_bytes

    model = tiny_wan()
    plain = estimate(model, 0.01)[0]
    assert any("--captions N" in n for n in plain.notes)  # left out, and said so
    counted = estimate(model, 0.01, captions=3, caption_tokens=7)[0]
    assert counted.delta_file_bytes - plain.delta_file_bytes == text_bytes(3, 7, 32) == 3 * 7 * 32 * 2
    many = estimate(model, 0.01, captions=100, caption_tokens=7)[0]
    assert many.delta_file_bytes - plain.delta_file_bytes == text_bytes(64, 7, 32)
    assert any("first 64 of 100" in n for n in many.notes)

    handle = ffid.attach(model, ffid.plan(model, 0.01, 0))
    text = {f"caption {i}": torch.ones(7, 32, dtype=torch.bfloat16) for i in range(3)}
    bare = handle.save_delta(tmp_path / "bare.safetensors")
    with_text = handle.save_delta(tmp_path / "text.safetensors", text=text)
    handle.detach()
    assert text_bytes(3, 7, 32) <= with_text - bare <= text_bytes(3, 7, 32) + 1024


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"captions": -1}, "--captions -1 is negative"),
        ({"captions": 2, "caption_tokens": 0}, "--caption_tokens 0 is outside 1..512"),
        ({"captions": 2, "caption_tokens": 513}, "--caption_tokens 513"),
    ],
)
def test_bad_caption_counts_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        estimate(tiny_wan(), 0.01, **kwargs)


def test_captions_on_a_model_without_a_text_encoder_input_are_refused():
    model = tiny_gpt2()
    assert not any("caption" in n for n in estimate(model, 0.01)[0].notes)
    with pytest.raises(ConfigError, match=r"no Wan text embedding.*leave --captions out"):
        estimate(model, 0.01, captions=2)
