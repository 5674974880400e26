"""ffid deltas on GGUF models loaded by ComfyUI-GGUF's own loader (run inside the ComfyUI venv).

``tests/test_comfyui.py`` runs this file with the ComfyUI environment's Python when ComfyUI-GGUF's
source (``$FFID_COMFYUI_GGUF_DIR``) and the ``gguf`` package are there. A tiny random Wan 2.1 DiT
(dim 256, so that every 2-D weight row is a whole number of 256-value K-quant blocks) is written as
a bf16 safetensors file (the base a delta is trained from) and as GGUF files made from it with the
``gguf`` package: one Q8_0 and one Q4_K (K-quant). Like ComfyUI-GGUF's ``tools/convert.py``, 1-D,
small (<= 1024 values) and ``modulation`` tensors and the 5-D patch embedding stay F32. The model
is loaded by ``UnetLoaderGGUF`` (ComfyUI-GGUF's node), which keeps each quantized weight as raw
blocks and, at every forward, dequantizes it and applies the ModelPatcher's patches to the result.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

# comfy_env sets ComfyUI's import path and --cpu: it must be imported before any comfy module
sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env

COMFY, GGUF_SRC = comfy_env.COMFY, Path(os.environ["FFID_COMFYUI_GGUF_DIR"])

import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_env import assert_same, make_delta, tiny_wan_fp32  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ffid.checkpoint import DeltaFile  # noqa: E402

QTYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_K": gguf.GGMLQuantizationType.Q4_K}
F32_MAX_VALUES = 1024  # ComfyUI-GGUF's convert.py keeps tensors this small in F32
QK_K = 256  # values per K-quant block


def _import_comfyui_gguf():
    """ComfyUI-GGUF as the package ComfyUI would import from custom_nodes (its modules import each
    other relatively, and its folder name is not an identifier)."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_gguf", GGUF_SRC / "__init__.py", submodule_search_locations=[str(GGUF_SRC)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_gguf"] = module
    spec.loader.exec_module(module)
    import comfyui_gguf.nodes

    return comfyui_gguf.nodes


GGUF_NODES = _import_comfyui_gguf()


# -- writing GGUF files -----------------------------------------------------------------------------
def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """Q4_K blocks of ``a`` (rows a multiple of 256 values) in ggml's layout: fp16 ``d``, fp16
    ``dmin``, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of 4-bit values.

    The ``gguf`` package dequantizes K-quants but cannot quantize them; this fits each sub-block of
    32 with its min and max (llama.cpp searches harder). Any valid block serves: the checks compare
    against what the loaded model dequantizes, and :func:`test_gguf_files_hold_the_model` checks
    that it is close to the random model.
    """
    n = a.size // QK_K
    x = a.reshape(n, 8, 32).astype(np.float32)
    low = np.minimum(x.min(-1), 0.0)
    step = (x.max(-1) - low) / 15.0
    d = (step.max(-1) / 63.0).astype(np.float16)
    dmin = ((-low).max(-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(step, d32, out=np.zeros_like(step), where=d32 > 0)), 0, 63)
    mn = np.clip(np.rint(np.divide(-low, dmin32, out=np.zeros_like(low), where=dmin32 > 0)), 0, 63)
    scale, offset = (d32 * sc)[..., None], (dmin32 * mn)[..., None]
    q = np.rint(np.divide(x + offset, scale, out=np.zeros_like(x), where=scale > 0))
    q = np.clip(q, 0, 15).astype(np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    # 6-bit scales: bytes 0-3 low scales (+2 high bits of scales 4-7), 4-7 low mins (+ high bits of
    # mins 4-7), 8-11 the low nibbles of scales and mins 4-7
    packed = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    qs = q[:, 0::2] | (q[:, 1::2] << 4)  # each 32-byte group: sub-block 2i low, 2i+1 high nibbles
    blocks = np.concatenate(
        [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), packed, qs.reshape(n, 128)],
        axis=1,
    )
    return blocks.reshape(*a.shape[:-1], a.shape[-1] // QK_K * blocks.shape[1])


def write_gguf(path: Path, sd: dict[str, torch.Tensor], qtype: str) -> Path:
    """``sd`` as a GGUF file for ComfyUI-GGUF: 2-D weights in ``qtype``, the rest F32."""
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, t in sd.items():
        a = t.to(torch.float32).numpy()
        if a.ndim != 2 or a.size <= F32_MAX_VALUES or "modulation" in key:
            writer.add_tensor(key, a, raw_dtype=gguf.GGMLQuantizationType.F32)
        elif qtype == "Q4_K":
            writer.add_tensor(key, quantize_q4_k(a), raw_dtype=QTYPES[qtype])
        else:
            writer.add_tensor(key, gguf.quants.quantize(a, QTYPES[qtype]), raw_dtype=QTYPES[qtype])
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """The bf16 base, its Q8_0 and Q4_K GGUF files, another model's Q8_0 file, and deltas."""
    root = tmp_path_factory.mktemp("gguf")
    for sub in ("unet", "loras"):
        (root / sub).mkdir()
    folder_paths.add_model_folder_path("unet", str(root / "unet"), is_default=True)
    folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
    folder_paths.folder_names_and_paths["unet_gguf"] = ([str(root / "unet")], {".gguf"})
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_wan_fp32(0, dim=256, ffn_dim=512, num_heads=2).items()}
    base = root / "base_bf16.safetensors"
    save_file(sd, str(base))
    for qtype in QTYPES:
        write_gguf(root / "unet" / f"tiny_{qtype}.gguf", sd, qtype)
    other = tiny_wan_fp32(1, dim=256, ffn_dim=512, num_heads=2)
    write_gguf(root / "unet" / "other_Q8_0.gguf", other, "Q8_0")
    d1 = make_delta(root / "loras" / "g1.safetensors", sd, seed=20)
    return {"root": root, "sd": sd, "base": base, "d1": d1}


# -- helpers --------------------------------------------------------------------------------------------
def _load(name: str):
    return GGUF_NODES.UnetLoaderGGUF().load_unet(name)[0]


def _apply(patcher, delta: Path, strength: float, **kw):
    from comfyui_ffid import nodes

    return nodes.FfidLoadDeltaModelOnly().load_delta(patcher, delta.name, strength, **kw)[0]


def _is_ggml_layer(m) -> bool:
    return hasattr(m, "get_weight") and hasattr(m, "is_ggml_quantized")


def _used(patcher) -> dict[str, torch.Tensor]:
    """Every weight of the diffusion model as its forward uses it (fp32 compute on CPU): a GGUF layer
    dequantizes its weight and applies its patches each time it casts it; other tensors are held."""
    out = {}
    cpu = torch.device("cpu")
    for mname, m in patcher.model.diffusion_model.named_modules():
        if _is_ggml_layer(m) and getattr(m, "weight", None) is not None:
            w, b = m.cast_bias_weight(dtype=torch.float32, device=cpu)
            out[f"{mname}.weight"] = torch.Tensor(w).clone()
            if b is not None:
                out[f"{mname}.bias"] = torch.Tensor(b).clone()
        for pname, p in m.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, torch.Tensor(p.detach()).clone())
    return out


def _raw(patcher) -> dict[str, tuple[bytes, int]]:
    """The quantized weights' raw blocks and how many patch entries each carries."""
    out = {}
    for name, p in patcher.model.diffusion_model.named_parameters():
        if getattr(p, "tensor_type", None) in set(QTYPES.values()):
            out[name] = (torch.Tensor(p.detach()).view(torch.uint8).numpy().tobytes(), len(p.patches))
    return out


def _forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    return model(x, torch.tensor([500.0]), ctx)


def _expected(before: dict[str, torch.Tensor], delta: Path, strength: float) -> dict[str, torch.Tensor]:
    """``before`` with every position of ``delta`` set as ``ffid merge --multiplier`` sets it, taking
    the dequantized weight as the base: fp32 ``base + S * (trained - base)``, rounded to the bf16 of
    the file the GGUF was made from."""
    want = {k: v.clone() for k, v in before.items()}
    with DeltaFile(delta) as df:
        for name in df.names:
            flat = want[name].view(-1)
            idx = df.read_indices(name)
            trained = df.read_values(name).reshape(-1).to(torch.float32)
            base = flat[idx]
            new = trained if strength == 1.0 else base + strength * (trained - base)
            flat[idx] = new.to(torch.bfloat16).to(torch.float32)
    return want


# -- the checks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_gguf_files_hold_the_model(files, qtype):
    """The files are what the model is: each quantized weight, as ComfyUI-GGUF dequantizes it,
    matches the ``gguf`` package's own dequantization of the file's blocks (up to the fp16 that
    ComfyUI-GGUF computes in by default) and the random model (up to the quantization error: about
    0.5% of the largest value for Q8_0, 5% for this simple Q4_K fit)."""
    patcher = _load(f"tiny_{qtype}.gguf")
    used = _used(patcher)
    dm = patcher.model.diffusion_model
    quantized = [n for n, p in dm.named_parameters() if getattr(p, "tensor_type", None) == QTYPES[qtype]]
    assert len(quantized) >= 20, quantized
    for name in quantized:
        raw = torch.Tensor(dict(dm.named_parameters())[name].detach()).numpy()
        ref = torch.from_numpy(gguf.quants.dequantize(raw, QTYPES[qtype])).reshape(used[name].shape)
        # ComfyUI-GGUF dequantizes in fp16 unless told otherwise: a few fp16 steps at the largest value
        assert float((used[name] - ref).abs().max()) <= float(ref.abs().max()) * 2**-8, name
        orig = files["sd"][name].to(torch.float32)
        err = (ref - orig).abs().max() / orig.abs().max()
        assert err < (0.02 if qtype == "Q8_0" else 0.15), (name, float(err))
    # the F32 tensors hold the bf16 file's values exactly
    assert torch.equal(used["blocks.0.modulation"], files["sd"]["blocks.0.modulation"].to(torch.float32))


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_gguf_weights_are_dequantized_plus_delta_and_unpatch_is_exact(files, qtype, strength, caplog):
    """Through ComfyUI-GGUF's lazy path (patches applied to the dequantized weight at each cast),
    every weight the model uses equals the dequantized weight with the delta's positions set as
    ``ffid merge --multiplier S`` sets them, and nothing else; a forward equals that of the same
    weights loaded from a safetensors file by ComfyUI's own loader; unpatching restores the
    dequantized weights and the raw blocks bit for bit and leaves no patch behind."""
    cpu = torch.device("cpu")
    base = _load(f"tiny_{qtype}.gguf")
    before, raw_before = _used(base), _raw(base)
    with caplog.at_level(logging.WARNING, logger="ffid.comfyui"):
        patched = _apply(base, files["d1"], strength)
    assert "GGUF-quantized tensor(s)" in caplog.text  # the fingerprint note, not a refusal
    want = _expected(before, files["d1"], strength)
    patched.patch_model(device_to=cpu)
    try:
        got = _used(patched)
        assert_same(got, want, f"{qtype} strength {strength}")
        q = "blocks.0.self_attn.q.weight"
        assert not torch.equal(got[q], before[q]) and _raw(patched)[q][1] == 1  # patched lazily
        out_got = _forward(patched.model.diffusion_model)
    finally:
        patched.unpatch_model(cpu)
    ref_file = files["root"] / f"want_{qtype}_{strength}.safetensors"
    save_file({k: v.contiguous() for k, v in want.items()}, str(ref_file))
    ref = comfy.sd.load_diffusion_model(str(ref_file), model_options={"dtype": torch.float32})
    ref.patch_model(device_to=cpu)
    assert torch.equal(out_got, _forward(ref.model.diffusion_model))
    assert_same(_used(base), before, f"{qtype} after unpatch")
    assert _raw(base) == raw_before  # same blocks, no patch entries left


def test_gguf_model_switching_through_comfy_model_management(files):
    """ComfyUI's model management loads the patched clone, the base and the clone again: each
    time the weights are the ones expected."""
    base = _load("tiny_Q4_K.gguf")
    before = _used(base)
    patched = _apply(base, files["d1"], 1.0)
    want = _expected(before, files["d1"], 1.0)
    mm = comfy.model_management
    try:
        for patcher, expect, what in [
            (patched, want, "delta"),
            (base, before, "base"),
            (patched, want, "again"),
        ]:
            mm.load_models_gpu([patcher])
            assert_same(_used(patcher), expect, f"switched to {what}")
    finally:
        mm.unload_all_models()
    assert_same(_used(base), before, "after unload_all_models")


def test_gguf_delta_for_another_base_is_refused_in_one_line(files):
    """The quantized tensors cannot be fingerprinted, the GGUF file's F32 tensors (norms, biases,
    modulation) can: a delta trained from another base is still refused."""
    with pytest.raises(ValueError) as exc:
        _apply(_load("other_Q8_0.gguf"), files["d1"], 1.0)
    msg = str(exc.value)
    assert "\n" not in msg and "g1.safetensors was not trained from this model" in msg, msg


def test_gguf_file_dtype_is_told_from_the_f32_tensors(files):
    from comfyui_ffid.ffid_patch import infer_file_dtype

    assert infer_file_dtype(_load("tiny_Q8_0.gguf")) == torch.bfloat16  # made from a bf16 file
    assert infer_file_dtype(_load("other_Q8_0.gguf")) == torch.float32  # made from an fp32 file


def test_gguf_implicit_delta_rebuilds_its_positions(files):
    """A format 2 delta (values only) rebuilds its positions from the GGUF model's logical shapes
    (the quantized tensors' storage is raw bytes) and patches what its explicit twin patches."""
    import ffid
    from ffid.checkpoint.extract import extract_delta

    sel = ffid.plan(files["base"], ff=0.02, ffid=3)
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for name, t in files["sd"].items():
        t = t.clone()
        if name in sel:
            flat, idx = t.view(-1), sel.indices(name)
            flat[idx] = (flat[idx].float() + torch.randn(idx.numel(), generator=g) * 0.05).to(t.dtype)
        tuned[name] = t
    tuned_file = files["root"] / "tuned_bf16.safetensors"
    save_file(tuned, str(tuned_file))
    loras = files["root"] / "loras"
    implicit = extract_delta(
        files["base"], tuned_file, loras / "gi.safetensors", selection=sel, indices="implicit"
    )
    explicit = extract_delta(files["base"], tuned_file, loras / "ge.safetensors", selection=sel)
    cpu = torch.device("cpu")
    got = {}
    for kind, d in (("implicit", implicit.path), ("explicit", explicit.path)):
        patched = _apply(_load("tiny_Q8_0.gguf"), d, 1.0)
        patched.patch_model(device_to=cpu)
        try:
            got[kind] = _used(patched)
        finally:
            patched.unpatch_model(cpu)
    assert_same(got["implicit"], got["explicit"], "implicit vs explicit delta on GGUF")
    assert_same(got["explicit"], _expected(_used(_load("tiny_Q8_0.gguf")), explicit.path, 1.0), "vs expected")
