"""Canonical names, block detection and the include/exclude pattern syntax."""

from __future__ import annotations

import re

import pytest
import torch
from tests.tiny_models import tiny_mlp

import ffid
from ffid.errors import ConfigError
from ffid.manifest import Manifest, TensorInfo, manifest_from_module
from ffid.names import BlockFinder, BlockKey, canonical_name, filter_names


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("_orig_mod.blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("module.blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("model.diffusion_model.blocks.0.ffn.0.weight", "blocks.0.ffn.0.weight"),
        ("module._orig_mod.model.diffusion_model.head.head.bias", "head.head.bias"),
        ("base_model.model.model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
        ("blocks.3._checkpoint_wrapped_module.ffn.0.weight", "blocks.3.ffn.0.weight"),
        ("model.layers.0._fsdp_wrapped_module.self_attn.q.weight", "model.layers.0.self_attn.q.weight"),
        ("model.layers.0.self_attn.q.weight", "model.layers.0.self_attn.q.weight"),  # LLM "model." stays
    ],
)
def test_canonical_name(raw, canonical):
    assert canonical_name(raw) == canonical
    assert canonical_name(canonical) == canonical  # idempotent


def _prefixed(manifest: Manifest, prefix: str) -> Manifest:
    return Manifest(
        [TensorInfo(canonical_name(prefix + t.name), t.shape, t.dtype, prefix + t.name) for t in manifest],
        "prefixed",
    )


@pytest.mark.parametrize("selector", ["spread", "compat-v2"])
@pytest.mark.parametrize("prefix", ["_orig_mod.", "module.", "model.diffusion_model.", "module._orig_mod."])
def test_wrapped_names_give_identical_selections(prefix, selector):
    base = ffid.load_manifest("wan2.1-t2v-1.3b")
    wrapped = _prefixed(base, prefix)
    assert all(t.source_name.startswith(prefix) for t in wrapped)
    a = ffid.plan(base, ff=0.01, ffid=3, selector=selector)
    b = ffid.plan(wrapped, ff=0.01, ffid=3, selector=selector)
    assert a.fingerprint == b.fingerprint and list(a) == list(b)
    name = "blocks.4.self_attn.q.weight" if selector == "spread" else next(iter(a))
    assert torch.equal(a.indices(name), b.indices(name))


def test_compiled_and_data_parallel_modules_select_the_same_weights():
    model = tiny_mlp()
    plain = ffid.plan(model, ff=0.05, ffid=2)
    compiled = torch.compile(model)  # names gain "_orig_mod." (nothing is compiled until called)
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    assert ffid.plan(compiled, ff=0.05, ffid=2).fingerprint == plain.fingerprint
    wrapped = torch.nn.DataParallel(model)
    assert ffid.plan(wrapped, ff=0.05, ffid=2).fingerprint == plain.fingerprint


# -- blocks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("blocks.12.self_attn.q.weight", BlockKey("blocks", 12)),  # Wan original and diffusers Wan
        ("transformer_blocks.3.attn.to_q.weight", BlockKey("transformer_blocks", 3)),  # diffusers DiTs
        ("single_transformer_blocks.7.proj_out.bias", BlockKey("single_transformer_blocks", 7)),  # Flux
        ("model.layers.30.mlp.down_proj.weight", BlockKey("model.layers", 30)),  # Llama-style LLMs
        ("transformer.h.0.attn.c_attn.weight", BlockKey("transformer.h", 0)),  # GPT-2
        ("head.head.weight", None),
        ("patch_embedding.weight", None),
        ("model.embed_tokens.weight", None),
        ("blocks.x.weight", None),
        ("myblocks.2.w", None),  # container names are whole components
    ],
)
def test_default_block_detection(name, block):
    assert BlockFinder()(name) == block


def test_block_pattern_override():
    finder = BlockFinder(r"^stage(\d+)\.")
    assert finder("stage4.conv.weight") == BlockKey("stage", 4)
    assert finder("blocks.1.w") is None
    m = Manifest(
        [TensorInfo(f"stage{i}.conv.weight", (4, 4), "F32", "x") for i in range(3)]
        + [TensorInfo("head.weight", (2, 4), "F32", "x")],
        block_pattern=r"^stage(\d+)\.",
    )
    assert [b.index for b in m.blocks()] == [0, 1, 2]
    sel = ffid.plan(m, ff=0.5, ffid=0, slots=1, block_pattern=r"^stage(\d+)\.")
    assert len(sel.manifest.blocks()) == 3


def test_block_pattern_errors():
    with pytest.raises(ConfigError, match="no capturing group"):
        BlockFinder(r"layers\.\d+\.")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        BlockFinder(r"layers\.(\d+")


def test_manifest_blocks_of_tiny_models():
    from tests.tiny_models import tiny_gpt2, tiny_llama, tiny_wan

    assert [b.label() for b in manifest_from_module(tiny_wan()).blocks()] == ["00", "01"]
    h = [BlockKey("transformer.h", 0), BlockKey("transformer.h", 1)]
    assert manifest_from_module(tiny_gpt2()).blocks() == h
    layers = [BlockKey("model.layers", 0), BlockKey("model.layers", 1)]
    assert manifest_from_module(tiny_llama()).blocks() == layers
    assert manifest_from_module(tiny_mlp()).blocks() == [BlockKey("blocks", 0), BlockKey("blocks", 1)]


# -- include / exclude -----------------------------------------------------------------------------
NAMES = [
    "blocks.0.self_attn.q.weight",
    "blocks.0.modulation",
    "blocks.1.ffn.0.weight",
    "head.modulation",
    "text_embedding.0.weight",
]


def test_include_exclude_are_regex_searches():
    assert filter_names(NAMES, include=["modulation"]) == ["blocks.0.modulation", "head.modulation"]
    q, ffn = "blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight"
    assert filter_names(NAMES, exclude=["modulation", "^text_"]) == [q, ffn]
    assert filter_names(NAMES, include=[r"^blocks\.0\."], exclude=["modulation"]) == [q]
    assert filter_names(NAMES, include=["ffn", "head"]) == ["blocks.1.ffn.0.weight", "head.modulation"]


def test_a_pattern_matching_nothing_lists_near_misses():
    with pytest.raises(ConfigError) as info:
        filter_names(NAMES, exclude=["modulaton"])
    msg = str(info.value)
    assert "--exclude pattern 'modulaton' matches no tensor" in msg and "'modulation'" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=re.escape("--include pattern 'zzz' matches no tensor")):
        filter_names(NAMES, include=["zzz"])


def test_filters_that_leave_nothing_are_an_error():
    with pytest.raises(ConfigError, match="leave no tensor"):
        filter_names(NAMES, include=["modulation"], exclude=["mod"])


def test_invalid_regex_is_a_config_error():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        filter_names(NAMES, include=["(unclosed"])


def test_spread_with_exclude_keeps_the_total_and_skips_the_tensors():
    sel = ffid.plan("wan2.2-t2v-14b", ff=0.01, ffid=1, exclude=["modulation", "embedding"])
    assert sel.selected == sel.target == 142_884_916
    assert not any("modulation" in n or "embedding" in n for n in sel)
    assert sel.params["exclude"] == ["modulation", "embedding"]
