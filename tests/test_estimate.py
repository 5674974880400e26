"""Tests of ``ffid.estimate`` and ``ffid estimate``: exact counts, part sums, optimizer state that
matches the real optimizers byte for byte, block swap bookkeeping, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from tests.tiny_models import tiny_gpt2, tiny_mlp, tiny_wan

import ffid
from ffid.errors import ConfigError
from ffid.estimate import (
    ENGINE,
    OPTIMIZERS,
    delta_file_bytes,
    estimate,
    estimate_selection,
    format_estimates,
    index_dtype_bytes,
    optimizer_state_bytes,
    use_case,
    wan_shape,
    wan_tokens,
)
from ffid.models import load_manifest
from ffid.presets.wan import WAN_CONFIGS
from matrix import MODELS

PRESET = "wan2.2-t2v-14b"


def _real_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of distinct tensors an optimizer holds (shared tensors such as bnb's maps once)."""
    seen: dict[int, int] = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values())


# -- exact trainable counts ------------------------------------------------------------------------
@pytest.mark.parametrize("model_key", MODELS)
@pytest.mark.parametrize(
    ("selector", "ff", "fid"), [("spread", 0.01, 0), ("spread", 0.05, 3), ("compat-v2", 0.1, 1)]
)
def test_trainable_is_the_planned_count(model_key, selector, ff, fid):
    model = MODELS[model_key].build()
    (est,) = estimate(model, [ff], ffid=fid, selector=selector)
    sel = ffid.plan(model, ff, fid, selector)
    assert est.trainable == sel.selected
    assert est.tensors_touched == len(sel)
    assert est.gpu["proxies"] == 4 * sel.selected
    assert est.gpu["gradients"] == 4 * sel.selected
    # int32 positions for every partially picked tensor, CSR row pointers on top for matmuls
    partial = sum(p.count for p in sel.values() if not p.whole)
    assert ENGINE.device_index_bytes * partial <= est.gpu["indices"]
    assert est.gpu["indices"] <= ENGINE.device_index_bytes * partial + 4 * sum(
        p.shape[0] + 1 for p in sel.values() if not p.whole
    )
    assert "host_indices" not in est.host  # the engine keeps no host copy of the indices
    assert est.gpu["base_resident"] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert est.gpu_total == sum(est.gpu.values())


def test_preset_counts_are_exact_and_whole_tensors_for_compat():
    spread, compat = estimate(PRESET, 0.001)[0], estimate(PRESET, 0.001, selector="compat-v2")[0]
    assert spread.trainable == round(0.001 * 14_288_491_584)
    # The seed's "~26M at ff 0.001" is whole tensors: compat-v2 overshoots by up to a tensor.
    assert compat.trainable == ffid.plan(PRESET, 0.001, 0, "compat-v2").selected
    assert 20e6 < compat.trainable < 30e6
    assert spread.total_params == 14_288_491_584 and spread.tensors_total == 1095 and spread.blocks == 40


def test_header_and_module_agree(tmp_path):
    from safetensors.torch import save_file

    model = tiny_wan()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    a = estimate(model, [0.01, 0.1])
    b = estimate(path, [0.01, 0.1])
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]


def test_more_ff_never_needs_less():
    ests = estimate(PRESET, [0.0001, 0.001, 0.01, 0.05], optimizer="adamw8bit")
    totals = [e.gpu_total for e in ests]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    sizes = [e.delta_file_bytes for e in ests]
    assert sizes == sorted(sizes)


def test_large_ff_falls_back_to_a_layout_that_fits_and_says_so():
    (est,) = estimate(PRESET, [0.1])
    assert est.trainable == round(0.1 * est.total_params)
    assert est.selector_options["slots"] < 16
    assert any("--slots" in n for n in est.notes)
    with pytest.raises(ConfigError):
        estimate(PRESET, [0.1], slots=16)
    (seeded,) = estimate(PRESET, [0.1], seed=3)  # another option given: the fallback still applies
    assert seeded.selector_options["seed"] == 3 and seeded.selector_options["slots"] < 16


# -- optimizer state matches the real optimizers ---------------------------------------------------
def _optimizers():
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    return {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "adafactor": lambda ps: Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-3),
        "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
        "adamw8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3),
        "lion8bit": lambda ps: bnb.optim.Lion8bit(ps, lr=1e-3),
    }


def _stepped(opt_cls, params, **kw):
    opt = opt_cls(params, **kw)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("counts", [[7, 300], [4095, 4096, 5000, 70_001]])
def test_optimizer_state_bytes_match_the_real_optimizer(name, counts):
    makers = _optimizers()
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in counts]
    opt = makers[name](ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert OPTIMIZERS[name].state_bytes(counts) == _real_state_bytes(opt)


def test_torch_adafactor_matches_too():
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in (3, 999)]
    opt = torch.optim.Adafactor(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert OPTIMIZERS["adafactor"].state_bytes([3, 999]) == _real_state_bytes(opt)


@pytest.mark.parametrize("shapes", [[(4, 6)], [(3,), (5, 7), (2, 3, 4)]])
def test_adafactor_factors_matrices_as_both_implementations_do(shapes):
    # matrices keep row and column sums, not a full second moment (the trainer passes real shapes)
    from transformers.optimization import Adafactor

    hf = _stepped(
        Adafactor,
        [torch.nn.Parameter(torch.zeros(s)) for s in shapes],
        lr=1e-3,
        relative_step=False,
        scale_parameter=False,
    )
    pt = _stepped(torch.optim.Adafactor, [torch.nn.Parameter(torch.zeros(s)) for s in shapes])
    model = OPTIMIZERS["adafactor"]
    assert model.state_bytes(shapes, hf.defaults) == _real_state_bytes(hf)
    assert model.state_bytes(shapes, pt.defaults) == _real_state_bytes(pt)
    assert model.state_bytes(shapes) < model.state_bytes([math.prod(s) for s in shapes])


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("AdamW", lambda ps: _stepped(torch.optim.AdamW, ps, amsgrad=True)),
        ("Adam", lambda ps: _stepped(torch.optim.Adam, ps)),
        ("SGD", lambda ps: _stepped(torch.optim.SGD, ps, lr=0.1, momentum=0.9)),
        ("SGD", lambda ps: _stepped(torch.optim.SGD, ps, lr=0.1)),
        ("PagedAdamW8bit", lambda ps: _stepped(_bnb().optim.PagedAdamW8bit, ps)),
        ("Lion8bit", lambda ps: _stepped(_bnb().optim.Lion8bit, ps)),
        (
            "Adafactor",
            lambda ps: _stepped(
                _hf_adafactor(), ps, lr=1e-3, beta1=0.9, relative_step=False, scale_parameter=False
            ),
        ),
    ],
)
def test_options_that_add_a_buffer_count(name, make):
    # the trainer's names and its optimizer's hyperparameters (momentum, amsgrad, beta1)
    shapes = [(7,), (4096,), (70_001,)]
    opt = make([torch.nn.Parameter(torch.zeros(s)) for s in shapes])
    assert optimizer_state_bytes(name, shapes, opt.defaults) == _real_state_bytes(opt)


def _bnb():
    import bitsandbytes as bnb

    return bnb


def _hf_adafactor():
    from transformers.optimization import Adafactor

    return Adafactor


def test_unknown_optimizers_have_no_figure():
    assert optimizer_state_bytes("torch.optim.RAdam", [10]) is None
    assert optimizer_state_bytes("adam_w", [10]) == OPTIMIZERS["adamw"].state_bytes([10])


# -- block swap, dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 24, 39])
def test_block_swap_moves_exactly_n_blocks_to_the_host(n):
    (est,) = estimate(PRESET, [0.001], blocks_to_swap=n)
    block_bytes = 351_394_304 * 2
    total = 14_288_491_584 * 2
    assert est.host["swapped_blocks"] == n * block_bytes
    assert est.gpu["base_resident"] == total - n * block_bytes
    assert est.gpu["swap_in_flight"] == min(n, 2) * block_bytes
    assert est.host["load_peak"] == total
    assert est.host_total == max(total, n * block_bytes)
    # indices live on the compute device where the blocks run, swapped or not
    assert est.gpu["indices"] == estimate(PRESET, [0.001])[0].gpu["indices"]


def test_fp8_base_halves_every_tensor():
    # musubi-tuner's --fp8_base casts the whole DiT (model.to(float8_e4m3fn)), vectors included
    bf16 = estimate(PRESET, [0.001])[0]
    fp8 = estimate(PRESET, [0.001], base_dtype="fp8")[0]
    assert fp8.gpu["base_resident"] == bf16.gpu["base_resident"] // 2
    assert fp8.gpu["workspace"] > bf16.gpu["workspace"]  # the upcast copy
    fp32 = estimate(PRESET, [0.001], base_dtype="fp32")[0]
    assert fp32.gpu["base_resident"] == 2 * bf16.gpu["base_resident"]
    assert fp32.compute_dtype == "F32"


# -- activations ----------------------------------------------------------------------------------
def test_wan_tokens_and_activation_inputs():
    shape = wan_shape(load_manifest(PRESET))
    assert shape is not None and (shape.dim, shape.ffn, shape.layers) == (5120, 13824, 40)
    assert wan_tokens(shape, 480, 832, 81) == 21 * 30 * 52
    five = wan_shape(load_manifest("wan2.2-ti2v-5b"))
    assert five is not None and wan_tokens(five, 704, 1280, 121) == 31 * 22 * 40  # 16x VAE
    assert wan_shape(load_manifest(tiny_wan())) is not None  # diffusers naming
    assert wan_shape(load_manifest(tiny_gpt2())) is None
    for name, cfg in WAN_CONFIGS.items():  # the header reader and the presets agree
        assert wan_shape(load_manifest(name)) == cfg.shape

    plain = estimate(PRESET, [0.001])[0]
    assert "activations" not in plain.gpu and any("activations" in n for n in plain.not_included)
    given = estimate(PRESET, [0.001], activations_gb=2.5)[0]
    assert given.gpu["activations"] == int(2.5 * 1024**3)
    small = estimate(PRESET, [0.001], video_size=(256, 256), frames=17)[0]
    big = estimate(PRESET, [0.001], video_size=(480, 832), frames=81)[0]
    assert 0 < small.gpu["activations"] < big.gpu["activations"]


# -- delta file, hints ----------------------------------------------------------------------------
def test_index_bytes_and_delta_size():
    assert [index_dtype_bytes(n) for n in (1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)] == [
        1,
        1,
        2,
        2,
        4,
        4,
        8,
    ]
    sel = ffid.plan(PRESET, 0.001, 0)
    data = sum(p.count * (4 + index_dtype_bytes(p.numel)) for p in sel.values())
    assert data < delta_file_bytes(sel) < data + 1_000_000


def test_use_case_follows_ff():
    assert use_case(0.001) != use_case(0.01) != use_case(0.1)
    assert "full" in use_case(1.0)


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"ffs": [0]},
        {"ffs": [1.5]},
        {"ffs": []},
        {"optimizer": "lion"},
        {"base_dtype": "int4"},
        {"blocks_to_swap": 40},
        {"blocks_to_swap": -1},
        {"activations_gb": -1.0},
        {"video_size": (480, 832)},
        {"video_size": (480, 832), "frames": 80},
        {"ffid": 16},
        {"selector": "nope"},
    ],
)
def test_bad_input_raises_config_error(kwargs):
    kwargs = {"ffs": [0.01], **kwargs}
    with pytest.raises(ConfigError):
        estimate(PRESET, kwargs.pop("ffs"), **kwargs)


def test_activation_estimate_refuses_non_wan_models():
    with pytest.raises(ConfigError, match="Wan"):
        estimate(tiny_gpt2(), [0.01], video_size=(64, 64), frames=1)
    with pytest.raises(ConfigError, match=r"no repeated blocks|finds no block number"):
        estimate(tiny_mlp(), [0.01], blocks_to_swap=1, block_pattern=r"nothing\.(\d+)\.")


# -- text and CLI ---------------------------------------------------------------------------------
def test_table_has_one_row_per_ff_and_the_breakdown():
    ests = estimate(PRESET, [0.001, 0.01], blocks_to_swap=10)
    text = format_estimates(ests, PRESET)
    for e in ests:
        assert f"{e.trainable:,}" in text
    for label in ("base on GPU", "proxies", "optimizer", "workspace", "swapped blocks", "Not included"):
        assert label in text


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys; from ffid.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'estimate from a header must not import torch'; sys.exit(rc)"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)


def test_cli_table_and_json_without_torch():
    out = _cli(
        "estimate", PRESET, "--ff", "0.001", "0.01", "--blocks_to_swap", "24", "--optimizer", "adamw8bit"
    )
    assert out.returncode == 0, out.stderr
    assert "14,288,492" in out.stdout and "142,884,916" in out.stdout
    js = _cli("estimate", PRESET, "--ff", "0.001", "--json", "--video_size", "480", "832", "--frames", "81")
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    (e,) = data["estimates"]
    assert e["trainable"] == 14_288_492 and e["gpu_bytes"] == sum(e["gpu"].values())
    assert "activations" in e["gpu"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--ff", "abc"],
        ["--ff", "0.01", "--optimizer", "lion"],
        ["--ff", "0.01", "--blocks_to_swap", "x"],
        ["--ff", "0.01", "--blocks_to_swap", "99"],
        ["--ff", "0.01", "--activations-gb", "lots"],
        ["--ff", "0.01", "--base-dtype", "int4"],
        ["--ff", "0.01", "--frames", "81"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, capsys):
    from ffid.cli import main

    assert main(["estimate", PRESET, *argv]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ffid estimate: error: ")
    assert out.out == ""


def test_cli_missing_file_is_exit_2(tmp_path, capsys):
    from ffid.cli import main

    assert main(["estimate", str(tmp_path / "missing.safetensors"), "--ff", "0.01"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_estimate_selection_takes_a_planned_selection():
    sel = ffid.plan(tiny_wan(), 0.05, 2)
    est = estimate_selection(sel, optimizer="sgd")
    assert est.trainable == sel.selected and est.gpu["optimizer"] == 0 and est.ffid == 2


def test_feature_pass_time_takes_float32_for_the_video_side_and_float64_for_the_text_side():
    """On a GPU the projection's video-side Gram products are float32, the text side's float64."""
    from ffid.estimate.projection import EFFICIENCY, FeaturePassCost

    cost = FeaturePassCost(
        tokens=1, forwards=2, forward_flops=3e12, gram_flops=10e12, gram_bytes=0, inputs=4, exact_flops=1e12
    )
    rate = EFFICIENCY * 1e12
    want = 2 * 3e12 / (100 * rate) + 4 * 9e12 / (50 * rate) + 4 * 1e12 / (2 * rate)
    assert abs(cost.seconds(100, 50, 2) - want) < 1e-9 * want
    # an all-text pass is bound by fp64 alone
    text_only = FeaturePassCost(1, 0, 0.0, 10e12, 0, 4, exact_flops=10e12)
    assert abs(text_only.seconds(100, 50, 2) - 4 * 10e12 / (2 * rate)) < 1e-6
