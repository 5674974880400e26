"""The ffid adapter against the weight-adapter contract of newer ComfyUI releases (run in the ComfyUI venv).

The pinned ComfyUI (v0.3.64) does not have it, so it is simulated here from the public source of
Comfy-Org/ComfyUI (``comfy/lora.py``, ``comfy/weight_adapter/base.py`` and ``bypass.py``), which
was read, not run:

- prefetching rebuilds every adapter as ``type(adapter)(adapter.loaded_keys, weights)``, where
  ``weights`` is the adapter's ``weights`` with each tensor copied into one staging buffer and
  viewed back with its dtype and shape, tuples and lists rebuilt, anything else passed as is;
- ``comfy.lora.calculate_shape`` asks each adapter ``calculate_shape(key)`` for the shape of the
  weight it produces (None: unchanged), and loads a weight lazily only if that shape is the weight's;
- bypass mode sets attributes on the adapter, assigns it ``weights`` moved to the compute device
  (cast to the layer's dtype when that is a float dtype), then calls ``bypass_forward`` (or ``h``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# comfy_env sets ComfyUI's import path and --cpu: it must be imported before any comfy module
sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env

REPO = comfy_env.REPO

import comfy.lora  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from comfy.weight_adapter.base import WeightAdapterBase  # noqa: E402
from comfyui_ffid.ffid_patch import FfidDeltaPatch  # noqa: E402

SHAPE = (24, 40)
KEY = "diffusion_model.blocks.0.self_attn.q.weight"


def _prefetch(value, staging: list[torch.Tensor]):
    """Newer ComfyUI's prefetch, as its source describes it: every tensor copied into a staging
    buffer and viewed back; adapters rebuilt from ``(loaded_keys, weights)``."""
    if isinstance(value, torch.Tensor):
        buf = torch.empty(value.numel() * value.element_size(), dtype=torch.uint8)
        buf.view(value.dtype).copy_(value.reshape(-1))
        staging.append(buf)
        return buf.view(value.dtype).view(value.shape)
    if isinstance(value, WeightAdapterBase):
        return type(value)(value.loaded_keys, _prefetch(value.weights, staging))
    if isinstance(value, tuple):
        return tuple(_prefetch(v, staging) for v in value)
    if isinstance(value, list):
        return [_prefetch(v, staging) for v in value]
    return value


def _calculate_shape(patches, weight, key):
    """Newer ComfyUI's ``comfy.lora.calculate_shape`` for adapter patches."""
    shape = weight.shape
    for p in patches:
        if isinstance(p[1], WeightAdapterBase) and p[3] is None:
            new = p[1].calculate_shape(key)
            shape = new if new is not None else shape
    return shape


def _patches() -> list[FfidDeltaPatch]:
    g = torch.Generator().manual_seed(1)
    numel = SHAPE[0] * SHAPE[1]
    idx = torch.randperm(numel, generator=g)[:97].sort().values.to(torch.int16)
    scattered = FfidDeltaPatch.create(
        idx, torch.randn(97, generator=g), SHAPE, torch.bfloat16, "d.safetensors"
    )
    whole = FfidDeltaPatch.create(
        None, torch.randn(numel, generator=g), SHAPE, torch.float32, "w.safetensors"
    )
    return [scattered, whole]


@pytest.mark.parametrize("which", [0, 1], ids=["scattered", "whole"])
def test_prefetch_rebuild_keeps_the_patch_whole(which):
    """The rebuilt adapter holds new tensors (the staging buffer's) and patches exactly as the
    original does, through ComfyUI's own calculate_weight, at strengths 1, 0.5 and -1."""
    patch = _patches()[which]
    staging: list[torch.Tensor] = []
    rebuilt = _prefetch(patch, staging)
    assert type(rebuilt) is FfidDeltaPatch and rebuilt.loaded_keys is patch.loaded_keys
    tensors = [t for t in rebuilt.weights if isinstance(t, torch.Tensor)]
    assert len(tensors) == len(staging) and all(
        t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        for t, b in zip(tensors, staging, strict=True)
    )
    assert rebuilt.weights[2:] == patch.weights[2:] and rebuilt.nbytes == patch.nbytes
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for strength in (1.0, 0.5, -1.0):
        want = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], base.clone(), KEY)
        got = comfy.lora.calculate_weight([(strength, rebuilt, 1.0, None, None)], base.clone(), KEY)
        assert torch.equal(got, want) and not torch.equal(got, base), strength


def test_calculate_shape_leaves_the_weight_shape():
    """A delta never reshapes a weight, so newer ComfyUI keeps lazy (lowvram) patching for it."""
    patch = _patches()[0]
    assert patch.calculate_shape(KEY) is None
    weight = torch.zeros(SHAPE)
    assert _calculate_shape([(1.0, patch, 1.0, None, None)], weight, KEY) == weight.shape


def test_bypass_mode_is_refused_in_one_line():
    """Bypass mode never reads the base weight, which a delta needs: refused, in one line, when
    it runs the layer; and when it casts the adapter's tensors to a float layer dtype (which would
    turn the positions into floats), already when it assigns them."""
    patch = _patches()[0]
    for attr, value in {"multiplier": 0.8, "is_conv": False, "kw_dict": {}, "shape": SHAPE}.items():
        setattr(patch, attr, value)  # what BypassForwardHook sets; none may break the adapter
    x = torch.randn(2, SHAPE[1])
    with pytest.raises(RuntimeError) as exc:
        patch.bypass_forward(lambda t: t @ torch.zeros(SHAPE).T, x)
    msg = str(exc.value)
    assert "\n" not in msg and "bypass mode cannot apply an ffid delta" in msg and "d.safetensors" in msg
    with pytest.raises(RuntimeError, match="bypass mode cannot apply"):
        patch.h(x, torch.zeros(2, SHAPE[0]))
    moved = tuple(t.to(dtype=torch.float16) if isinstance(t, torch.Tensor) else t for t in patch.weights)
    with pytest.raises(TypeError) as exc:
        patch.weights = moved
    msg = str(exc.value)
    assert "\n" not in msg and "positions became torch.float16" in msg and "bypass mode" in msg
    patch.weights = tuple(patch.weights)  # moved without a cast (a quantized layer's case): kept
    base = torch.randn(SHAPE)
    ok = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], base.clone(), KEY)
    assert not torch.equal(ok, base)


@pytest.mark.parametrize(
    "weights, words",
    [
        ((1, 2), "needs weights (indices or None, values, shape, file dtype, source)"),
        ((None, torch.zeros(3, dtype=torch.int64), (3,), torch.float32, "x"), "flat float tensor"),
        ((torch.arange(2), torch.zeros(3), (3,), torch.float32, "x"), "2 positions but 3 values"),
        ((None, torch.zeros(3), (3,), "bf16", "x"), "must be ints and a dtype"),
    ],
)
def test_a_malformed_rebuild_is_refused_in_one_line(weights, words):
    with pytest.raises((TypeError, ValueError)) as exc:
        FfidDeltaPatch(set(), weights)
    assert "\n" not in str(exc.value) and words in str(exc.value), str(exc.value)
