"""``ffid estimate`` for Wan 2.2 A14B as users run it: musubi's ``--fp8_scaled`` base, both experts
in one run (``--dit_high_noise``, ``--offload_inactive_dit``) and the fewest ``--blocks_to_swap``
that fit a card (``--gpu-gb``). Figures are checked against hand arithmetic on a small manifest;
none of this imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ffid.errors import ConfigError
from ffid.estimate import CONTEXT_BYTES, estimate, fp8_scale_numel, fp8_scaled_target
from ffid.manifest import Manifest, TensorInfo

PRESET = "wan2.2-t2v-14b"
GiB = 1024**3


def _small(dtype: str = "BF16") -> Manifest:
    """Two Wan-like blocks and a head, small enough to add up by hand."""
    shapes = {"head.head.weight": (4, 128), "head.head.bias": (4,)}
    for i in (0, 1):
        b = f"blocks.{i}."
        shapes |= {
            b + "self_attn.q.weight": (8, 128),  # 128 % 64 == 0: block scales [8, 2, 1]
            b + "self_attn.q.bias": (8,),
            b + "self_attn.norm_q.weight": (128,),  # a norm: excluded from quantization
            b + "ffn.0.weight": (8, 100),  # 100 % 64 != 0: per-channel scales [8, 1]
            b + "modulation": (1, 3, 8),  # not a .weight
        }
    return Manifest([TensorInfo(n, s, dtype, n) for n, s in shapes.items()], "small")


# Hand arithmetic for _small() as bf16 and as fp8-scaled, per block:
#   q.weight 8x128 = 1024 elements: fp8 1024 B, scales 8 x 2 x 2 B = 32 B     (bf16: 2048 B)
#   q.bias 8, norm_q 128, modulation 24: 160 elements, bf16 320 B either way
#   ffn.0.weight 8x100 = 800 elements: fp8 800 B, scales 8 x 2 B = 16 B      (bf16: 1600 B)
# head: 516 elements, bf16 1032 B either way.
BLOCK_FP8 = 1024 + 320 + 800  # the parts the offloader moves (weights) and the rest of a block
BLOCK_SCALES = 32 + 16
BLOCK_BF16 = 2048 + 320 + 1600
HEAD = 1032


def test_musubi_targets_and_scale_shapes():
    m = _small()
    targets = sorted(t.name for t in m if fp8_scaled_target(t))
    assert targets == [f"blocks.{i}.{n}.weight" for i in (0, 1) for n in ("ffn.0", "self_attn.q")]
    assert fp8_scale_numel((8, 128)) == 16 and fp8_scale_numel((8, 100)) == 8
    assert fp8_scale_numel((5120, 5120)) == 5120 * 80 and fp8_scale_numel((3, 4, 5)) == 1


def test_fp8_scaled_base_bytes_by_hand():
    (bf16,) = estimate(_small(), [0.05])
    (scaled,) = estimate(_small(), [0.05], base_dtype="fp8-scaled")
    assert bf16.gpu["base_resident"] == 2 * BLOCK_BF16 + HEAD
    assert scaled.gpu["base_resident"] == 2 * (BLOCK_FP8 + BLOCK_SCALES) + HEAD
    assert scaled.host["load_peak"] == scaled.gpu["base_resident"]  # quantized while reading
    assert scaled.compute_dtype == "BF16" and scaled.base_dtype == "fp8-scaled"
    # one swapped block: its weights go to the host, its scales (buffers) stay on the GPU
    (swap,) = estimate(_small(), [0.05], base_dtype="fp8-scaled", blocks_to_swap=1)
    assert swap.host["swapped_blocks"] == BLOCK_FP8
    assert swap.gpu["base_resident"] == BLOCK_FP8 + 2 * BLOCK_SCALES + HEAD
    assert swap.gpu["swap_in_flight"] == BLOCK_FP8


def test_fp8_scaled_transients_by_hand():
    # nothing in the blocks trained: every quantized Linear takes musubi's patched forward
    (head_only,) = estimate(_small(), [0.005], base_dtype="fp8-scaled", include=["head"])
    # workspace >= musubi's two bf16 copies of the largest quantized weight (q: 1024 elements)
    assert head_only.gpu["workspace"] >= 2 * 1024 * 2
    # autograd keeps one block's dequantized weights for its backward: (1024 + 800) x 2 B
    assert head_only.gpu["dequant_kept"] == (1024 + 800) * 2
    # spread touches every block Linear: ffid's own path keeps none
    (spread,) = estimate(_small(), [0.05], base_dtype="fp8-scaled")
    assert spread.gpu["dequant_kept"] == 0
    assert "dequant_kept" not in estimate(_small(), [0.05])[0].gpu


def test_fp8_scaled_sits_between_fp8_and_bf16_on_the_14b():
    bf16, fp8, scaled = (estimate(PRESET, [0.01], base_dtype=b)[0] for b in ("bf16", "fp8", "fp8-scaled"))
    assert fp8.gpu["base_resident"] < scaled.gpu["base_resident"] < bf16.gpu["base_resident"]
    linear = 40 * (8 * 5120 * 5120 + 2 * 13824 * 5120)  # quantized elements
    scales = 40 * (8 * 5120 * 80 + 13824 * 80 + 5120 * 216) * 2
    assert scaled.gpu["base_resident"] == bf16.gpu["base_resident"] - linear + scales
    # the trained state does not depend on the base
    for part in ("proxies", "gradients", "optimizer", "indices"):
        assert scaled.gpu[part] == bf16.gpu[part]


@pytest.mark.parametrize("base", [None, "fp8-scaled"])
@pytest.mark.parametrize(("swap", "offload"), [(0, False), (0, True), (24, False)])
def test_two_experts_add_the_right_terms(base, swap, offload):
    (one,) = estimate(PRESET, [0.01], base_dtype=base, blocks_to_swap=swap, optimizer="adamw")
    (two,) = estimate(
        PRESET, [0.01], base_dtype=base, blocks_to_swap=swap, experts=2, offload_inactive_dit=offload
    )
    expert = one.gpu["base_resident"] + one.host["swapped_blocks"]  # one expert's weights
    assert two.experts == 2
    # the other expert's weights, where musubi keeps them
    if swap:
        assert two.gpu["inactive_expert"] == one.gpu["base_resident"]
        assert two.host["inactive_expert"] == one.host["swapped_blocks"]
        assert two.host["load_peak"] == one.host["load_peak"] + one.host["swapped_blocks"]
    elif offload:
        assert two.gpu["inactive_expert"] == 0
        assert two.host["inactive_expert"] == two.host["expert_switch"] == expert
        assert two.host_total == max(one.host["load_peak"], 2 * expert)
    else:
        assert two.gpu["inactive_expert"] == expert and two.host["inactive_expert"] == 0
    # trainable state twice (the same selection in each expert), indices and transients once
    for part in ("proxies", "gradients"):
        assert two.gpu[part] == 2 * one.gpu[part]
    assert two.gpu["optimizer"] == 2 * one.gpu["optimizer"]  # AdamW: per element and per tensor
    extra = one.gpu["proxies"] + one.gpu["gradients"] + one.gpu["optimizer"] + two.gpu["inactive_expert"]
    assert two.gpu_total == one.gpu_total + extra
    assert two.delta_file_bytes == 2 * one.delta_file_bytes
    assert two.trainable == one.trainable


def test_high_noise_file_must_match(tmp_path):
    pytest.importorskip("safetensors")
    import numpy as np
    from safetensors.numpy import save_file

    def write(name: str, rows: int) -> str:
        path = tmp_path / name
        save_file({"blocks.0.ffn.0.weight": np.zeros((rows, 64), np.float32)}, str(path))
        return str(path)

    low, high, other = write("low.safetensors", 8), write("high.safetensors", 8), write("x.safetensors", 9)
    (two,) = estimate(low, [0.1], dit_high_noise=high)
    assert two.experts == 2
    with pytest.raises(ConfigError, match=r"blocks\.0\.ffn\.0\.weight"):
        estimate(low, [0.1], dit_high_noise=other)


def test_gpu_gb_finds_the_fewest_blocks_that_fit():
    kw = {"base_dtype": "fp8-scaled", "experts": 2, "optimizer": "adamw8bit", "activations_gb": 4.0}
    (est,) = estimate(PRESET, [0.01], gpu_gb=24, **kw)
    fit = est.fit
    assert fit is not None and fit.fits and fit.budget_bytes == 24 * GiB
    (at,) = estimate(PRESET, [0.01], blocks_to_swap=fit.blocks_to_swap, **kw)
    (below,) = estimate(PRESET, [0.01], blocks_to_swap=fit.blocks_to_swap - 1, **kw)
    assert fit.gpu_bytes == at.gpu_total and at.gpu_total + CONTEXT_BYTES <= 24 * GiB
    assert below.gpu_total + CONTEXT_BYTES > 24 * GiB
    (tight,) = estimate(PRESET, [0.01], gpu_gb=4, **kw)
    assert tight.fit is not None and not tight.fit.fits and tight.fit.blocks_to_swap == 39
    (roomy,) = estimate(PRESET, [0.001], gpu_gb=141)
    assert roomy.fit is not None and roomy.fit.fits and roomy.fit.blocks_to_swap == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"experts": 3}, "1 or 2"),
        ({"offload_inactive_dit": True}, "--offload_inactive_dit needs --dit_high_noise"),
        ({"experts": 2, "offload_inactive_dit": True, "blocks_to_swap": 8}, "drop one"),
        ({"gpu_gb": 0.5}, "--gpu-gb"),
        ({"gpu_gb": "lots"}, "--gpu-gb"),
        ({"base_dtype": "fp9-scaled"}, "fp8-scaled"),
    ],
)
def test_bad_input_is_one_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        estimate(PRESET, [0.01], **kwargs)


def test_fp8_scaled_refuses_an_fp8_file():
    with pytest.raises(ConfigError, match="already F8_E4M3"):
        estimate(_small("F8_E4M3"), [0.05], base_dtype="fp8-scaled")


# -- CLI ------------------------------------------------------------------------------------------
def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from ffid.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'estimate from a header must not import torch'; sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)


def test_cli_a14b_fp8_scaled_block_swap_on_24gb():
    argv = ["estimate", PRESET, "--ff", "0.001", "0.01", "--fp8_scaled", "--dit_high_noise"]
    argv += ["--blocks_to_swap", "30", "--optimizer", "adamw8bit", "--video_size", "480", "832"]
    argv += ["--frames", "33", "--gpu-gb", "24"]
    out = _cli(*argv)
    assert out.returncode == 0, out.stderr
    for text in ("base fp8-scaled", "both experts", "other expert", "dequant kept", "On a 24 GiB card"):
        assert text in out.stdout
    js = _cli(*argv, "--json")
    assert js.returncode == 0, js.stderr
    for e in json.loads(js.stdout)["estimates"]:
        assert e["experts"] == 2 and e["base_dtype"] == "fp8-scaled" and e["fit"]["fits"]
        assert e["gpu_bytes"] == sum(e["gpu"].values())


@pytest.mark.parametrize(
    "argv",
    [
        ["--fp8_scaled", "--base-dtype", "bf16"],
        ["--offload_inactive_dit"],
        ["--dit_high_noise", "--offload_inactive_dit", "--blocks_to_swap", "4"],
        ["--gpu-gb", "x"],
        ["--dit_high_noise", "missing_high.safetensors"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    from ffid.cli import main

    assert main(["estimate", PRESET, "--ff", "0.01", *argv]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffid estimate: error: ")
    assert out.out == ""
