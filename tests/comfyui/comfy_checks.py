"""The ComfyUI node against ComfyUI's own loading and patching code (run inside the ComfyUI venv).

Not collected by the main test run (its name does not start with ``test_``): ``tests/test_comfyui.py``
runs this file with the interpreter of the ComfyUI environment (``.venv-comfy``), because
ComfyUI's dependencies must not change the versions ffid's own tests run with. Everything runs
under ``torch.inference_mode()``, as ComfyUI runs nodes.

A tiny Wan 2.1 DiT (dim 128, 2 blocks) in original naming is written as bf16 / fp16 / fp32
safetensors files and loaded by ``comfy.sd.load_diffusion_model``; deltas are written with ffid's
own writer and merged with ``ffid merge`` (``merge_checkpoint``); "as ComfyUI would load it"
means the merged file loaded by the same loader.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# comfy_env sets ComfyUI's import path and --cpu: it must be imported before any comfy module
sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_env

REPO = comfy_env.REPO

import comfy.float  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from comfy_env import PICKED, assert_same, make_delta, tiny_wan_fp32  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ffid.checkpoint import merge_checkpoint  # noqa: E402
from ffid.checkpoint.delta import (  # noqa: E402
    DeltaTensor,
    TensorFingerprint,
    sample_positions,
    values_hash,
    write_delta,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX = "diffusion_model."


# -- fixtures: files ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    (root / "loras").mkdir()
    folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
    return root


def _save_base(path: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    save_file({k: v.to(dtype) for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def files(work):
    """Base files (bf16/fp16/fp32 of one model), a bf16 base of another model, and deltas."""
    sd = tiny_wan_fp32(0)
    bases = {d: _save_base(work / f"base_{d}.safetensors", sd, dt) for d, dt in DTYPES.items()}
    other = _save_base(work / "other_bf16.safetensors", tiny_wan_fp32(1), torch.bfloat16)
    base_bf16 = load_file(str(bases["bf16"]))
    loras = work / "loras"
    d1 = make_delta(
        loras / "char1.safetensors", base_bf16, seed=10,
        metadata={"ffid.trigger_words": ["zqx woman"], "ffid.prompts": ["a zqx woman walking"]},
        text={"a zqx woman walking": torch.ones(6, 16, dtype=torch.bfloat16)},  # stored encodings ride along
    )  # fmt: skip
    d2 = make_delta(loras / "char2.safetensors", base_bf16, seed=11, avoid=PICKED[d1.name], ffid_id=2)
    dw = make_delta(
        loras / "whole.safetensors", base_bf16, seed=12,
        whole=("blocks.0.self_attn.q.weight", "blocks.1.modulation", "head.head.bias"),
    )  # fmt: skip
    dd = make_delta(loras / "char1_diffusers.safetensors", base_bf16, seed=10, naming="diffusers")
    # the same character trained from the fp16 and fp32 files of the model (fingerprints differ)
    by_dtype = {"bf16": d1}
    for d in ("fp16", "fp32"):
        by_dtype[d] = make_delta(loras / f"char1_{d}.safetensors", load_file(str(bases[d])), seed=10)
    return {
        "sd": sd, "bases": bases, "other": other, "d1": d1, "d2": d2, "whole": dw, "diffusers": dd,
        "by_dtype": by_dtype,
    }  # fmt: skip


def _merged(work: Path, base: Path, deltas: list[Path], mults: list[float]) -> Path:
    tag = "_".join(f"{d.stem}@{m}" for d, m in zip(deltas, mults, strict=True))
    out = work / f"merged_{base.stem}_{tag}.safetensors"
    if not out.exists():
        merge_checkpoint(base, deltas, out, multipliers=mults)
    return out


# -- helpers: ComfyUI -----------------------------------------------------------------------------
def _load(path: Path, dtype: torch.dtype | None = None):
    opts = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.load_diffusion_model(str(path), model_options=opts)


def _nodes():
    from comfyui_ffid import nodes

    return nodes


def _apply(patcher, delta: Path, strength: float, **kw):
    node = _nodes().FfidLoadDeltaModelOnly()
    return node.load_delta(patcher, delta.name, strength, **kw)[0]


def _weights(patcher) -> dict[str, torch.Tensor]:
    """Every weight of the diffusion model as it is used now (lowvram layers: as cast for compute)."""
    out = {}
    dm = patcher.model.diffusion_model
    for mname, m in dm.named_modules():
        lowvram = getattr(m, "comfy_cast_weights", False) and (m.weight_function or m.bias_function)
        if lowvram:
            w, b = comfy.ops.cast_bias_weight(m, dtype=m.weight.dtype, device=torch.device("cpu"))
            out[f"{mname}.weight"] = w.clone()
            if b is not None:
                out[f"{mname}.bias"] = b.clone()
        for pname, p in m.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, p.detach().clone())
    return out


def _forward(patcher) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g)
    t = torch.tensor([500.0])
    return patcher.model.diffusion_model(x, t, ctx)


def _loaded_state(patcher, **load) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    patcher.patch_model(device_to=torch.device("cpu"), **load)
    try:
        return _weights(patcher), _forward(patcher)
    finally:
        patcher.unpatch_model(torch.device("cpu"))


# -- the checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_full_load_equals_merge_and_unpatch_restores(work, files, dtype, strength):
    base_file = files["bases"][dtype]
    base = _load(base_file)
    before, out_before = _loaded_state(base)
    delta = files["by_dtype"][dtype]
    patched = _apply(base, delta, strength)
    want, out_want = _loaded_state(_load(_merged(work, base_file, [delta], [strength])))
    got, out_got = _loaded_state(patched)
    assert_same(got, want, f"{dtype} strength {strength} vs ffid merge")
    assert torch.equal(out_got, out_want)
    assert not torch.equal(got["blocks.0.modulation"], before["blocks.0.modulation"])  # the skipped key
    # unpatched: the base, bit for bit (weights and one forward)
    after = _weights(patched)
    assert_same(after, before, "after unpatch")
    assert torch.equal(_loaded_state(base)[1], out_before)


def test_chained_deltas_equal_merge_of_both(work, files):
    base_file = files["bases"]["bf16"]
    base = _load(base_file)
    # 0.3 is not exact in binary: the strength must enter the fp32 arithmetic as merge's does
    chained = _apply(_apply(base, files["d1"], 1.0), files["d2"], 0.3)
    want, out_want = _loaded_state(_load(_merged(work, base_file, [files["d1"], files["d2"]], [1.0, 0.3])))
    got, out_got = _loaded_state(chained)
    assert_same(got, want, "two chained deltas vs ffid merge of both")
    assert torch.equal(out_got, out_want)


def test_whole_tensors_diffusers_naming_and_int64_indices(work, files):
    base_file = files["bases"]["bf16"]
    base = _load(base_file)
    # compat-v2 style whole tensors
    got, _ = _loaded_state(_apply(base, files["whole"], 0.5))
    want, _ = _loaded_state(_load(_merged(work, base_file, [files["whole"]], [0.5])))
    assert_same(got, want, "whole-tensor delta")
    # the same delta in diffusers naming gives the same weights
    want1, _ = _loaded_state(_load(_merged(work, base_file, [files["d1"]], [1.0])))
    got_d, _ = _loaded_state(_apply(base, files["diffusers"], 1.0))
    assert_same(got_d, want1, "diffusers-named delta")
    # every index width: the file has U8, U16 and U32 indices; rewrite them all as I64
    from safetensors import safe_open

    with safe_open(str(files["d1"]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    widths = {str(t.dtype) for k, t in tensors.items() if k.endswith(".ffid_index")}
    assert {"torch.uint8", "torch.uint16", "torch.uint32"} <= widths, widths
    wide = work / "loras" / "char1_i64.safetensors"
    save_file(
        {k: t.to(torch.int64) if k.endswith(".ffid_index") else t for k, t in tensors.items()},
        str(wide),
        meta,
    )
    got64, _ = _loaded_state(_apply(base, wide, 1.0))
    assert_same(got64, want1, "I64 indices")


def test_lowvram_and_partial_unload_reload(work, files):
    base_file = files["bases"]["bf16"]
    base = _load(base_file)
    before = _weights(base)
    want, out_want = _loaded_state(_load(_merged(work, base_file, [files["d1"]], [0.5])))
    patched = _apply(base, files["d1"], 0.5)
    cpu = torch.device("cpu")
    budget = patched.model_size() // 3
    patched.patch_model(device_to=cpu, lowvram_model_memory=budget)
    try:
        assert patched.model.model_lowvram and patched.model.lowvram_patch_counter > 0
        assert_same(_weights(patched), want, "lowvram")
        assert torch.equal(_forward(patched), out_want)
        freed = patched.partially_unload(cpu, memory_to_free=patched.model_size() // 4)
        assert freed > 0
        assert_same(_weights(patched), want, "after partial unload")
        patched.partially_load(cpu, extra_memory=patched.model_size())
        assert_same(_weights(patched), want, "after partial reload")
        assert torch.equal(_forward(patched), out_want)
    finally:
        patched.unpatch_model(cpu)
    assert_same(_weights(base), before, "after lowvram unpatch")


def test_model_switching_through_comfy_model_management(work, files):
    base_file = files["bases"]["bf16"]
    base = _load(base_file)
    before = _weights(base)
    full = _apply(base, files["d1"], 1.0)
    half = _apply(base, files["d1"], 0.5)
    want_full = _loaded_state(_load(_merged(work, base_file, [files["d1"]], [1.0])))[0]
    want_half = _loaded_state(_load(_merged(work, base_file, [files["d1"]], [0.5])))[0]
    mm = comfy.model_management
    try:
        for patcher, want, what in [
            (full, want_full, "strength 1"),
            (half, want_half, "strength 0.5"),
            (base, before, "base"),
            (full, want_full, "strength 1 again"),
        ]:
            mm.load_models_gpu([patcher])
            assert_same(_weights(patcher), want, f"switched to {what}")
    finally:
        mm.unload_all_models()
    assert_same(_weights(base), before, "after unload_all_models")


def test_fp8_e4m3fn(work, files):
    """fp8: ComfyUI rounds every patched weight stochastically (seeded by its key), LoRA or not.

    What is exact: each weight equals ComfyUI's own ``stochastic_rounding`` of the fp32 merged
    values (the fp8 base upcast, the delta applied and rounded to the file's bf16) with ComfyUI's
    seed for that key; tensors ComfyUI keeps in a higher precision equal the merged file exactly;
    unpatch restores the fp8 base bit for bit."""
    fp8 = torch.float8_e4m3fn
    base_file = files["bases"]["bf16"]
    base = _load(base_file, fp8)
    before = _weights(base)
    assert before["blocks.0.self_attn.q.weight"].dtype == fp8
    patched = _apply(base, files["d1"], 1.0)  # refused base fingerprints would raise here
    got, _ = _loaded_state(patched)
    merged_sd = load_file(str(_merged(work, base_file, [files["d1"]], [1.0])))
    exact = 0
    for k, w in got.items():
        b = before[k]
        if w.dtype != fp8:
            assert torch.equal(w, merged_sd[k].to(w.dtype)), k
            exact += 1
            continue
        idx = PICKED["char1.safetensors"][k]
        ref = b.to(torch.float32).reshape(-1).clone()
        ref[idx] = merged_sd[k].reshape(-1)[idx].to(torch.float32)
        want = comfy.float.stochastic_rounding(
            ref.reshape(b.shape), fp8, seed=comfy.model_patcher.string_to_seed(PREFIX + k)
        )
        assert torch.equal(w.view(torch.uint8), want.view(torch.uint8)), k
    assert exact > 0
    assert_same(_weights(base), before, "fp8 after unpatch")
    # lowvram: the weight is cast for compute first and patched there, with no fp8 rounding after:
    # the trained positions hold the merged file's values, the others the fp8 base (upcast).
    patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        key = "blocks.1.ffn.2.weight"
        mod = patched.model.diffusion_model.blocks[1].ffn[2]
        w, _ = comfy.ops.cast_bias_weight(mod, dtype=torch.float32, device=torch.device("cpu"))
        want = before[key].to(torch.float32).reshape(-1).clone()
        idx = PICKED["char1.safetensors"][key]
        want[idx] = merged_sd[key].reshape(-1)[idx].to(torch.float32)
        assert torch.equal(w.reshape(-1), want)
    finally:
        patched.unpatch_model(torch.device("cpu"))
    assert_same(_weights(base), before, "fp8 after lowvram unpatch")


def _scaled_fp8_file(work: Path, base_file: Path) -> Path:
    sd = load_file(str(base_file))
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.startswith("blocks.") and k.endswith(".weight"):
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[k] = v
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = work / "base_scaled_fp8.safetensors"
    save_file(out, str(path))
    return path


def test_scaled_fp8(work, files):
    """Scaled fp8: the delta is applied to the dequantized weight, then ComfyUI re-quantizes it
    (``set_weight``: divide by the scale, round stochastically). Exact against that; restore exact."""
    path = _scaled_fp8_file(work, files["bases"]["bf16"])
    base = _load(path)
    before = _weights(base)
    key = "blocks.0.ffn.0.weight"
    assert before[key].dtype == torch.float8_e4m3fn and "blocks.0.ffn.0.scale_weight" in before
    patched = _apply(base, files["d1"], 1.0)
    got, _ = _loaded_state(patched)
    merged_sd = load_file(str(_merged(work, files["bases"]["bf16"], [files["d1"]], [1.0])))
    scale = before["blocks.0.ffn.0.scale_weight"].float()
    ref = (before[key].float() * scale).reshape(-1)
    idx = PICKED["char1.safetensors"][key]
    ref[idx] = merged_sd[key].reshape(-1)[idx].float()
    want = comfy.float.stochastic_rounding(
        ref.reshape(before[key].shape) / scale,
        torch.float8_e4m3fn,
        seed=comfy.model_patcher.string_to_seed(PREFIX + key),
    )
    assert torch.equal(got[key].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got["blocks.0.modulation"], merged_sd["blocks.0.modulation"].float())
    assert_same(_weights(base), before, "scaled fp8 after unpatch")


def test_delta_for_another_base_is_refused_in_one_line(files):
    other = _load(files["other"])
    with pytest.raises(ValueError) as exc:
        _apply(other, files["d1"], 1.0)
    msg = str(exc.value)
    assert "\n" not in msg and "char1.safetensors was not trained from this model" in msg, msg
    # verify off: applied anyway, on the user's word
    _apply(other, files["d1"], 1.0, verify="off")
    # fp8: the fp8 tensors cannot be checked exactly, the ones ComfyUI keeps wider still refuse
    with pytest.raises(ValueError, match="was not trained from this model"):
        _apply(_load(files["other"], torch.float8_e4m3fn), files["d1"], 1.0)


def test_a_wan22_expert_delta_on_the_other_model_names_the_expert(work, files):
    """A two-expert musubi run's delta (``ffid.expert``) given to another model: the one-line
    refusal says which expert it belongs to."""
    from safetensors import safe_open

    tensors = load_file(str(files["d1"]))
    with safe_open(str(files["d1"]), "pt") as f:
        meta = dict(f.metadata())
    path = work / "loras" / "char1_high_noise.safetensors"
    save_file(tensors, str(path), metadata={**meta, "ffid.expert": "high_noise"})
    with pytest.raises(ValueError) as exc:
        _apply(_load(files["other"]), path, 1.0)
    msg = str(exc.value)
    assert "\n" not in msg and "belongs to Wan 2.2's high_noise expert" in msg, msg


def test_memory_held_is_about_the_delta_file(files):
    from comfyui_ffid.ffid_patch import infer_file_dtype, read_delta

    base = _load(files["bases"]["fp32"])
    assert infer_file_dtype(base) == torch.float32
    assert infer_file_dtype(_load(files["bases"]["bf16"])) == torch.bfloat16  # held in fp32 on CPU
    assert infer_file_dtype(_load(files["bases"]["fp16"])) == torch.float16
    delta = files["by_dtype"]["fp32"]
    loaded = read_delta(delta, base, torch.float32, verify=True)
    size = os.path.getsize(delta)
    print(f"\nheld {loaded.nbytes} bytes for a {size}-byte delta file ({loaded.nbytes / size:.3f}x)")
    assert loaded.nbytes <= size


def test_info_node_shows_trigger_words(files):
    text = _nodes().FfidDeltaInfo().info(files["d1"].name)["result"][0]
    assert text.index("zqx woman") < text.index("ffid.ff:"), text
    assert "a zqx woman walking" in text and "ffid id: 1" in text
    assert "text encodings: 1 prompt(s) stored" in text and "ffid.text_prompts" not in text
    text2 = _nodes().FfidDeltaInfo().info(files["d2"].name)["result"][0]
    assert "not recorded" in text2


def test_node_package_loads_at_comfyui_startup(tmp_path, files):
    """The package loads the way ComfyUI's startup loads custom nodes: ``main.py`` calls
    ``nodes.init_external_custom_nodes()``, which imports every folder of ``custom_nodes`` with
    ``load_custom_node`` and reads its ``pyproject.toml`` (``[tool.comfy]``). (The pinned snapshot
    has no ``main.py``/``server.py``, so ``main.py --quick-test-for-ci`` itself cannot run here.)"""
    import asyncio

    import nodes
    from comfy_config import config_parser

    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    target = custom / "comfyui_ffid"
    target.symlink_to(REPO / "comfyui_ffid", target_is_directory=True)  # the documented install
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    asyncio.run(nodes.init_external_custom_nodes())
    cls = nodes.NODE_CLASS_MAPPINGS.get("FfidLoadDeltaModelOnly")
    assert cls is not None, "ComfyUI could not import the custom node package (see the log above)"
    assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.comfyui_ffid"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FfidLoadDeltaModelOnly"] == "Load ffid delta (model only)"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FfidDeltaInfo"] == "ffid delta info"
    cfg = config_parser.extract_node_configuration(str(target))
    assert cfg is not None and cfg.project.name == "comfyui-ffid"
    assert cfg.tool_comfy.display_name == "ffid deltas"
    assert "char1.safetensors" in cls.INPUT_TYPES()["required"]["delta_name"][0]


def test_a_clone_of_the_repository_loads_as_a_custom_node(tmp_path, files):
    """``git clone <ffid> ComfyUI/custom_nodes/ffid``: the repository root's ``__init__.py`` hands
    ComfyUI the nodes of ``comfyui_ffid/`` (ComfyUI imports each custom_nodes folder as a package)."""
    import asyncio

    import nodes

    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    (custom / "ffid").symlink_to(REPO, target_is_directory=True)  # what a clone puts there
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    for name in ("FfidLoadDeltaModelOnly", "FfidDeltaInfo"):  # ComfyUI keeps a node registered first
        nodes.NODE_CLASS_MAPPINGS.pop(name, None)
    asyncio.run(nodes.init_external_custom_nodes())
    cls = nodes.NODE_CLASS_MAPPINGS.get("FfidLoadDeltaModelOnly")
    assert cls is not None, "ComfyUI could not import the repository as a custom node (see the log above)"
    assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ffid"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["FfidDeltaInfo"] == "ffid delta info"


def test_example_workflow_matches_the_nodes():
    """The documented workflow (API format) uses the nodes' real input names and choices. Nodes
    from ComfyUI's comfy_extras (not in the pinned snapshot) are only checked by name."""
    import json

    import nodes

    extras = {"ModelSamplingSD3", "EmptyHunyuanLatentVideo", "SaveAnimatedWEBP"}
    ours = _nodes().NODE_CLASS_MAPPINGS
    wf = json.loads((REPO / "comfyui_ffid" / "workflows" / "wan_t2v_two_characters_api.json").read_text())
    file_inputs = {"unet_name", "clip_name", "vae_name", "delta_name"}
    seen = set()
    for node_id, node in wf.items():
        cls_name = node["class_type"]
        if cls_name in extras:
            continue
        cls = ours.get(cls_name) or nodes.NODE_CLASS_MAPPINGS[cls_name]
        seen.add(cls_name)
        spec = cls.INPUT_TYPES()
        allowed = {**spec["required"], **spec.get("optional", {})}
        assert set(spec["required"]) <= set(node["inputs"]), (node_id, cls_name)
        for name, value in node["inputs"].items():
            assert name in allowed, (node_id, name)
            kind = allowed[name][0]
            if isinstance(kind, list) and name not in file_inputs and not isinstance(value, list):
                assert value in kind, (node_id, name, value)
    assert {"FfidLoadDeltaModelOnly", "FfidDeltaInfo", "UNETLoader", "KSampler"} <= seen


def test_cache_is_per_model_and_overlaps_are_counted(files, caplog):
    """One node instance reuses the delta it read only for the same model object (another model is
    checked again), and a delta chained onto itself is reported as overlapping everywhere."""
    from comfyui_ffid.ffid_patch import overlap_count

    node = _nodes().FfidLoadDeltaModelOnly()
    base = _load(files["bases"]["bf16"])
    once = node.load_delta(base, "char1.safetensors", 1.0)[0]
    loaded = node._cache[2]
    node.load_delta(base, "char1.safetensors", 0.5)
    assert node._cache[2] is loaded  # same file, same model: not read again
    with pytest.raises(ValueError, match="was not trained from this model"):
        node.load_delta(_load(files["other"]), "char1.safetensors", 1.0)
    total = sum(len(v) for v in PICKED["char1.safetensors"].values())
    assert overlap_count(once, loaded) == total
    from comfyui_ffid.ffid_patch import read_delta

    d2 = read_delta(files["d2"], base, torch.bfloat16, verify=True)
    assert overlap_count(once, d2) == 0
    with caplog.at_level("WARNING", logger="ffid.comfyui"):
        node.load_delta(once, "char1.safetensors", 1.0)
    assert f"shares {total} positions" in caplog.text


def test_implicit_delta_equals_merge_and_explicit(work, files):
    """A format 2 delta (values only, positions rebuilt by ffid's planner from the loaded model's
    shapes) patches exactly what `ffid merge` writes, and what its explicit twin patches."""
    import ffid
    from ffid.checkpoint.extract import extract_delta

    base_file = files["bases"]["bf16"]
    sd = load_file(str(base_file))
    sel = ffid.plan(base_file, ff=0.02, ffid=3)
    g = torch.Generator().manual_seed(5)
    tuned = {}
    for name, t in sd.items():
        t = t.clone()
        if name in sel:
            flat = t.view(-1)
            idx = sel.indices(name)
            flat[idx] = (flat[idx].float() + torch.randn(idx.numel(), generator=g) * 0.05).to(t.dtype)
        tuned[name] = t
    tuned_file = work / "tuned_implicit_bf16.safetensors"
    save_file(tuned, str(tuned_file))
    loras = work / "loras"
    implicit = extract_delta(
        base_file, tuned_file, loras / "implicit.safetensors", selection=sel, indices="implicit"
    ).path
    explicit = extract_delta(base_file, tuned_file, loras / "explicit.safetensors", selection=sel).path
    want, out_want = _loaded_state(_load(_merged(work, base_file, [implicit], [1.0])))
    got, out_got = _loaded_state(_apply(_load(base_file), implicit, 1.0))
    assert_same(got, want, "implicit delta vs ffid merge")
    twin, _ = _loaded_state(_apply(_load(base_file), explicit, 1.0))
    assert_same(got, twin, "implicit vs explicit delta")
    assert torch.equal(out_got, out_want)


def _delta_of_values(path: Path, base: dict[str, torch.Tensor], name: str, value: float) -> Path:
    """A delta setting 8 positions of one tensor to ``value`` (a finite fp32 number)."""
    flat = base[name].reshape(-1)
    idx = torch.arange(0, 8 * 13, 13)
    fp = TensorFingerprint(tuple(base[name].shape), values_hash(flat[idx[sample_positions(8)]]))
    write_delta(
        path, [DeltaTensor(name, tuple(base[name].shape), idx, torch.full((8,), value))],
        selector="spread", params={"ff": 0.01, "ffid": 9, "seed": 0}, selection_fingerprint="0" * 16,
        base_fingerprint={name: fp},
        base_manifest_fingerprint="0" * 16, naming="wan", total_params=sum(t.numel() for t in base.values()),
        source="train",
    )  # fmt: skip
    return path


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_strength_is_refused(files, strength):
    base = _load(files["bases"]["bf16"])
    with pytest.raises(ValueError, match="not a finite number"):
        _apply(base, files["d1"], strength)
    assert not base.patches


@pytest.mark.parametrize("value,strength", [(2e4, 4.0), (1e5, 1.0), (-1e5, 1.0)])
def test_a_result_beyond_the_fp16_range_is_refused(work, files, value, strength):
    """At strength 4 a value of 2e4 becomes 8e4, past fp16's 65504; 1e5 is past it at strength 1:
    patching would write inf into the weights, so nothing is patched (``ffid merge`` refuses too)."""
    name = "blocks.0.self_attn.q.weight"
    fp16 = load_file(str(files["bases"]["fp16"]))
    delta = _delta_of_values(work / "loras" / f"big_{value}_{strength}.safetensors", fp16, name, value)
    for held in (None, torch.float16):  # as ComfyUI chooses (fp32 on CPU) and held in fp16
        base = _load(files["bases"]["fp16"], held)
        with pytest.raises(ValueError, match=f"{name}.*NaN/inf"):
            _apply(base, delta, strength)
        assert not base.patches
    fine = _apply(_load(files["bases"]["fp16"]), delta, 1.0 if abs(value) < 65504 else 0.5)
    got, _ = _loaded_state(fine)
    assert torch.isfinite(got[name]).all()
