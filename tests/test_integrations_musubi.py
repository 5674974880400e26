"""ffid.integrations.musubi driven by the musubi-tuner stand-in (tests/musubi_harness.py)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import ffid
from ffid.errors import ConfigError, FfidError, MismatchError
from ffid.integrations import musubi
from musubi_harness import (
    TinyWanConfig,
    default_args,
    flow_loss,
    make_batches,
    run_training,
    sample,
    tiny_wan_original,
)

NET_ARGS = ["ff=0.05", "ffid=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path=None, **kw):
    kw.setdefault("network_args", list(NET_ARGS))
    if tmp_path is not None:
        kw.setdefault("output_dir", str(tmp_path))
    return default_args(**kw)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _effective(model: torch.nn.Module, handle) -> dict[str, torch.Tensor]:
    """The model's state with the handle's trained values written in (what a merged file holds)."""
    return {k: v.clone() for k, v in handle.effective_state()}


# -- the stand-in itself -------------------------------------------------------------------------
def test_harness_model_uses_original_wan_naming():
    from ffid.presets.wan import WanConfig, wan_shapes

    c = TinyWanConfig()
    cfg = WanConfig(
        "tiny",
        c.dim,
        c.ffn_dim,
        c.num_layers,
        c.num_heads,
        c.in_dim,
        c.out_dim,
        c.text_dim,
        c.freq_dim,
        c.patch,
    )
    shapes = {k: tuple(v.shape) for k, v in tiny_wan_original().state_dict().items()}
    assert shapes == wan_shapes(cfg)


def test_harness_block_swap_moves_storage_but_keeps_parameters():
    m = tiny_wan_original()
    q = m.blocks[2].self_attn.q.weight
    # keeping the original storage alive stops the allocator from handing its address back to a
    # later copy, which made the pointer check below fail at random
    original = q.data
    before_ptr, before_obj = q.data_ptr(), q
    m.enable_block_swap(2)
    flow_loss(m, make_batches(1)[0], None)
    assert m.blocks[2].self_attn.q.weight is before_obj
    assert q.data_ptr() != before_ptr and m.offloader.swaps >= 2
    assert original.data_ptr() == before_ptr


# -- network_args ----------------------------------------------------------------------------------
def test_parse_network_args_full():
    c = musubi.parse_network_args(
        {
            "ff": "0.01",
            "ffid": " 3",
            "selector": "spread",
            "slots": "8",
            "seed": "2",
            "include": "blocks;head",
            "exclude": r"modulation; ^head\.modulation",
            "save_dtype": "bf16",
        }
    )
    s = c.selection
    assert (s.ff, s.ffid, s.selector) == (0.01, 3, "spread")
    assert s.include == ("blocks", "head") and s.exclude == ("modulation", r"^head\.modulation")
    assert s.options == {"slots": 8, "seed": 2} and c.save_dtype == torch.bfloat16
    assert musubi.parse_network_args({"ff": "0.5", "ffid": "0", "save_dtype": "auto"}).save_dtype is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ffid": "1"}, "needs ff="),
        ({"ff": "0.01"}, "needs ffid="),
        ({"ff": "0.01", "ffid": "1", "fid": "2"}, "did you mean 'ffid'"),
        ({"ff": "2", "ffid": "1"}, "out of range"),
        ({"ff": "x", "ffid": "1"}, "not a number"),
        ({"ff": "0.01", "ffid": "one"}, "not an integer"),
        ({"ff": "0.01", "ffid": "1", "selector": "sprad"}, "unknown"),
        ({"ff": "0.01", "ffid": "1", "selector": "compat-v2", "slots": "4"}, "compat-v2 takes no options"),
        ({"ff": "0.01", "ffid": "1", "slots": "many"}, "network_args slots 'many' is not an integer"),
        ({"ff": "0.01", "ffid": "1", "save_dtype": "int8"}, "save_dtype"),
    ],
)
def test_parse_network_args_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        musubi.parse_network_args(kwargs)
    assert "\n" not in str(err.value)


def test_create_arch_network_rejects_bad_patterns_and_dropout():
    model = tiny_wan_original()
    with pytest.raises(ConfigError, match="matches no tensor"):
        musubi.create_arch_network(
            1.0, None, None, None, None, model, ff="0.05", ffid="1", exclude="nosuchthing"
        )
    with pytest.raises(ConfigError, match="network_dropout"):
        musubi.create_arch_network(
            1.0, None, None, None, None, model, neuron_dropout=0.1, ff="0.05", ffid="1"
        )
    assert musubi.create_network is musubi.create_arch_network


# -- training in musubi's order ----------------------------------------------------------------------
def test_training_changes_only_proxies_and_sampling_sees_them(tmp_path):
    model = tiny_wan_original()
    base = _state(model)
    seen = []

    def on_step(step, net, transformer):
        # what musubi's sampling runs mid-training == a plain model holding the trained values
        ref = tiny_wan_original()
        ref.load_state_dict(_effective(transformer, net.handle))
        seen.append((sample(transformer), sample(ref)))

    res = run_training(_args(sample_every_n_steps=2), transformer=model, on_step=on_step)
    net = res.unwrapped
    assert isinstance(net, musubi.FfidNetwork)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert {id(p) for p in net.get_trainable_params()} == {id(p) for p in net.handle.parameters()}
    assert res.grad_devices_ok
    # base weights never written: the stored state of the DiT is bit for bit the original
    for k, v in _state(model).items():
        assert torch.equal(v, base[k]), k
    trained, original = net.handle.trained_values(), net.handle.base_values()
    assert any(not torch.equal(trained[n], original[n]) for n in trained)
    for live, ref in seen:
        torch.testing.assert_close(live, ref, rtol=0, atol=1e-6)
    assert not torch.equal(seen[0][0], sample(tiny_wan_original()))
    # the network's state (what --save_state stores) is the proxies plus a fingerprint
    sd = net.state_dict()
    n_values = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    assert n_values == net.handle.selection.selected
    assert n_values < 0.1 * sum(p.numel() for p in model.parameters())


def _train_values(**kw):
    res = run_training(_args(**kw))
    return res, res.unwrapped.handle.trained_values()


@pytest.mark.parametrize(
    "variant",
    [
        {"blocks_to_swap": 2},
        {"gradient_checkpointing": True},
        {"blocks_to_swap": 2, "gradient_checkpointing": True},
    ],
    ids=["block-swap", "grad-ckpt", "swap+ckpt"],
)
def test_block_swap_and_checkpointing_train_the_same_values(variant):
    _, ref = _train_values()
    res, got = _train_values(**variant)
    if variant.get("blocks_to_swap"):
        assert res.swaps > 4  # the stand-in really moved storages around forward and backward
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=1e-6)


def test_bf16_mixed_precision_keeps_fp32_proxies_and_learns():
    res = run_training(
        _args(
            mixed_precision="bf16",
            blocks_to_swap=2,
            gradient_checkpointing=True,
            max_train_steps=6,
            learning_rate=5e-3,
        )
    )
    net = res.unwrapped
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert next(res.transformer.blocks[0].parameters()).dtype == torch.bfloat16
    assert res.grad_devices_ok and all(torch.isfinite(torch.tensor(res.losses)))
    trained, base = net.handle.trained_values(), net.handle.base_values()
    # updates far below bf16's rounding step survive in the fp32 proxies
    diffs = torch.cat([(trained[n] - base[n]).abs().reshape(-1) for n in trained])
    assert 0 < diffs[diffs > 0].min() < 1e-3


def test_full_bf16_network_to_keeps_fp32(caplog):
    res = run_training(_args(full_bf16=True, mixed_precision="bf16", max_train_steps=1))
    assert all(p.dtype == torch.float32 for p in res.unwrapped.parameters())
    assert "stay fp32" in caplog.text


def test_fp8_base_trains():
    res = run_training(_args(fp8_base=True, mixed_precision="bf16", max_train_steps=3))
    q = res.transformer.blocks[0].self_attn.q
    assert q.weight.data.dtype == q._parameters["weight"].dtype == torch.float8_e4m3fn  # stored in fp8
    assert all(torch.isfinite(torch.tensor(res.losses)))
    trained, base = res.unwrapped.handle.trained_values(), res.unwrapped.handle.base_values()
    assert any(not torch.equal(trained[n], base[n]) for n in trained)


def test_adamw8bit_optimizer():
    pytest.importorskip("bitsandbytes")
    # min_8bit_size lowered so the tiny proxies really get 8-bit state (default is 4096 elements)
    res = run_training(
        _args(
            optimizer_type="AdamW8bit",
            optimizer_args=["min_8bit_size=16"],
            blocks_to_swap=2,
            max_train_steps=3,
        )
    )
    states = [s for s in res.optimizer.optimizer.state.values() if "state1" in s]
    assert any(s["state1"].dtype == torch.uint8 for s in states)
    assert res.grad_devices_ok
    trained, base = res.unwrapped.handle.trained_values(), res.unwrapped.handle.base_values()
    assert any(not torch.equal(trained[n], base[n]) for n in trained)


def test_max_norm_regularization_bounds_each_update():
    res = run_training(_args(max_train_steps=3, learning_rate=5e-2))
    net = res.unwrapped
    scaled, mean, largest = net.apply_max_norm_regularization(1e-3, "cpu")
    assert scaled > 0 and largest <= 1e-3 + 1e-9 and 0 < mean <= largest + 1e-12
    trained, base = net.handle.trained_values(), net.handle.base_values()
    assert max(float((trained[n] - base[n]).norm()) for n in trained) <= 1e-3 + 1e-6


# -- files -------------------------------------------------------------------------------------------
def test_save_weights_then_merge_into_original_checkpoint(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ffid.checkpoint.merge import merge_checkpoint

    model = tiny_wan_original()
    base_file = tmp_path / "wan_tiny.safetensors"
    save_file(
        {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(base_file)
    )
    res = run_training(_args(tmp_path, save_every_n_steps=2), transformer=model)
    delta = tmp_path / "ffid-test.safetensors"
    assert str(delta) in res.saved and len(res.saved) == 3
    with safe_open(str(delta), "pt") as f:
        md = f.metadata()
    assert md["ffid.format"] == "ffid-delta" and md["ss_network_module"] == "ffid.integrations.musubi"
    assert md["modelspec.architecture"] == "wan2.1-t2v-14b/ffid-delta"
    assert json.loads(md["ss_network_args"]) == {"ff": "0.05", "ffid": "1"} and md["ss_steps"] == "4"
    assert md["ffid.value_dtype"] == "F32"

    out = tmp_path / "merged.safetensors"
    merge_checkpoint(base_file, [delta], out)
    merged = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(out)).items()}
    expected = _effective(model, res.unwrapped.handle)
    assert merged.keys() == expected.keys()
    for k in expected:
        assert torch.equal(merged[k], expected[k]), k
    # the merged file, loaded into a plain model, runs exactly like the trained one
    plain = tiny_wan_original()
    plain.load_state_dict(merged)
    torch.testing.assert_close(sample(plain), sample(res.transformer), rtol=0, atol=1e-6)


def test_ffid_merge_cli_on_musubi_output(tmp_path):
    from safetensors.torch import load_file, save_file

    from ffid.cli import main

    model = tiny_wan_original()
    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base_file))
    res = run_training(_args(tmp_path, max_train_steps=2), transformer=model)
    out = tmp_path / "merged.safetensors"
    rc = main(["merge", str(base_file), str(tmp_path / "ffid-test.safetensors"), "-o", str(out)])
    assert rc == 0
    expected = _effective(model, res.unwrapped.handle)
    merged = load_file(str(out))
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_network_weights_continue_from_delta(tmp_path):
    first = run_training(_args(tmp_path, max_train_steps=2))
    delta = tmp_path / "ffid-test.safetensors"
    trained = first.unwrapped.handle.trained_values()
    # a fresh run with --network_weights starts from those values (load_weights' info is printed)
    second = run_training(_args(network_weights=str(delta), max_train_steps=0))
    assert "trained values" in second.load_info
    got = second.unwrapped.handle.trained_values()
    assert all(torch.equal(got[n], trained[n]) for n in trained)
    # continuing 2 + 2 steps equals 4 steps only up to the optimizer state, but it must move on
    third = run_training(_args(network_weights=str(delta), max_train_steps=2))
    assert any(not torch.equal(third.unwrapped.handle.trained_values()[n], trained[n]) for n in trained)


def test_network_weights_from_an_implicit_delta_and_base_weights_refusing_one(tmp_path):
    from safetensors.torch import load_file

    from ffid.checkpoint.convert import convert_delta
    from ffid.errors import ModelFileError

    first = run_training(_args(tmp_path, max_train_steps=2))
    trained = first.unwrapped.handle.trained_values()
    implicit = tmp_path / "implicit.safetensors"
    convert_delta(tmp_path / "ffid-test.safetensors", implicit, indices="implicit", base=tiny_wan_original())
    # --network_weights opens the file itself: positions rebuilt from the run's own selection
    second = run_training(_args(network_weights=str(implicit), max_train_steps=0))
    got = second.unwrapped.handle.trained_values()
    assert all(torch.equal(got[n], trained[n]) for n in trained)
    # --base_weights gets the tensors without the metadata: refused, naming the conversion
    with pytest.raises(ModelFileError, match="ffid convert"):
        musubi._delta_from_weights(load_file(str(implicit)), tiny_wan_original())


def test_network_weights_of_another_selection_is_refused(tmp_path):
    run_training(_args(tmp_path, max_train_steps=1))
    with pytest.raises(MismatchError, match="same network_args"):
        run_training(
            _args(
                network_weights=str(tmp_path / "ffid-test.safetensors"),
                network_args=["ff=0.05", "ffid=2"],
                max_train_steps=0,
            )
        )


def test_base_weights_merge_then_train_another_id(tmp_path):
    first = run_training(_args(tmp_path, max_train_steps=2))
    expected = _effective(first.transformer, first.unwrapped.handle)
    # --base_weights goes through create_arch_network_from_weights(...).merge_to(...)
    second = run_training(
        _args(
            base_weights=[str(tmp_path / "ffid-test.safetensors")],
            network_args=["ff=0.05", "ffid=2"],
            max_train_steps=1,
        )
    )
    h2 = second.unwrapped.handle
    base2 = h2.base_values()
    for name, values in base2.items():
        idx = h2.selection.indices(name)
        assert torch.equal(values, expected[name].reshape(-1)[idx].float())
    # the first id's values are in the base now; the second run never touched them
    state = _state(second.transformer)
    sel1 = first.unwrapped.handle.selection
    for name in sel1:
        idx = sel1.indices(name)
        assert torch.equal(state[name].reshape(-1)[idx], expected[name].reshape(-1)[idx])


def test_base_weights_multiplier_and_dim_from_weights(tmp_path):
    from safetensors.torch import load_file

    first = run_training(_args(tmp_path, max_train_steps=2))
    sd = load_file(str(tmp_path / "ffid-test.safetensors"))
    model = tiny_wan_original()
    before = _state(model)
    pair = musubi.create_arch_network_from_weights(0.5, sd, unet=model, for_inference=True)
    net, weights = pair
    assert weights is sd and isinstance(net, musubi.FfidNetwork)
    pair.merge_to(None, model, sd, torch.float32, "cpu")
    h = first.unwrapped.handle
    trained, base = h.trained_values(), h.base_values()
    for name in trained:
        idx = h.selection.indices(name)
        got = model.state_dict()[name].reshape(-1)[idx]
        torch.testing.assert_close(got, base[name] + 0.5 * (trained[name] - base[name]), rtol=0, atol=1e-7)
    # --dim_from_weights: a network on exactly the delta's positions
    model2 = tiny_wan_original()
    net2, _ = musubi.create_arch_network_from_weights(1, sd, unet=model2)
    net2.apply_to(None, model2)
    assert net2.handle.selection.selected == h.selection.selected
    assert all(torch.equal(net2.handle.selection.indices(n), h.selection.indices(n)) for n in h.selection)
    assert not torch.equal(before["blocks.0.ffn.0.weight"], model.state_dict()["blocks.0.ffn.0.weight"])


def test_base_weights_that_are_not_a_delta_are_refused():
    model = tiny_wan_original()
    with pytest.raises(FfidError, match="not an ffid delta"):
        musubi.create_arch_network_from_weights(
            1.0, {"lora_unet_x.lora_up.weight": torch.zeros(2)}, unet=model
        )


def test_save_state_is_small_and_resume_restores(tmp_path):
    res = run_training(_args(tmp_path, save_every_n_steps=2, save_state=True, max_train_steps=2))
    (state_dir,) = res.states
    files = {f: os.path.getsize(os.path.join(state_dir, f)) for f in os.listdir(state_dir)}
    model_bytes = sum(p.numel() * 4 for p in res.transformer.parameters())
    # the network's weights in the state: proxies (4 bytes each) + fingerprint + header
    weights = [f for f in files if f.startswith("model")]
    assert weights and sum(files[f] for f in weights) < 0.1 * model_bytes
    trained = res.unwrapped.handle.trained_values()
    resumed = run_training(_args(resume=state_dir, max_train_steps=0))
    got = resumed.unwrapped.handle.trained_values()
    assert all(torch.equal(got[n], trained[n]) for n in trained)


def test_resume_of_another_selection_is_refused(tmp_path):
    res = run_training(_args(tmp_path, save_every_n_steps=1, save_state=True, max_train_steps=1))
    with pytest.raises(FfidError, match="selection"):
        run_training(_args(resume=res.states[0], network_args=["ff=0.05", "ffid=3"], max_train_steps=0))


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharding_wrappers_are_refused(kind, monkeypatch):
    import accelerate
    from accelerate.utils import DistributedType

    class FakeState:
        distributed_type = DistributedType[kind]

    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    net = musubi.create_arch_network(1.0, None, None, None, None, tiny_wan_original(), ff="0.05", ffid="1")
    with pytest.raises(ConfigError, match="does not run under"):
        net.prepare_network(default_args())
    for ok in ("NO", "MULTI_GPU", "MULTI_CPU"):
        FakeState.distributed_type = DistributedType[ok]
        net.prepare_network(default_args())


def test_nan_trained_values_stop_the_run():
    from ffid.errors import TrainingError

    res = run_training(_args(max_train_steps=1))
    net = res.unwrapped
    net.on_step_start()  # finite: nothing happens
    _, proxy = next(iter(net.handle.proxies()))
    with torch.no_grad():
        proxy[0] = float("nan")
    with pytest.raises(TrainingError, match="NaN/inf"):
        net.on_step_start()


def test_two_experts_with_preservation_and_h2d_only_swap_are_refused():
    import argparse

    net = musubi.create_arch_network(1.0, None, None, None, None, tiny_wan_original(), ff="0.05", ffid="1")
    net.prepare_network(argparse.Namespace(dit_high_noise="/models/high.safetensors"))  # trained, not refused
    preserving = musubi.create_arch_network(
        1.0, None, None, None, None, tiny_wan_original(), ff="0.05", ffid="1", preserve_cache="/x"
    )
    with pytest.raises(ConfigError, match="preservation"):
        preserving.prepare_network(argparse.Namespace(dit_high_noise="/models/high.safetensors"))
    with pytest.raises(ConfigError, match="drop --block_swap_h2d_only") as err:
        net.prepare_network(argparse.Namespace(block_swap_h2d_only=True, blocks_to_swap=2))
    assert "--blocks_to_swap" in str(err.value)
    net.prepare_network(argparse.Namespace(fp8_base=True, fp8_scaled=True))  # trained, not refused


def test_why_h2d_only_block_swap_is_refused():
    """What musubi's H2D-only offloader (LoRAStreamOffloader, CUDA only) does to each streamed
    Linear, replayed on CPU on an attached DiT: it asserts ``not m.weight.requires_grad`` and keeps
    ``m.weight`` as the CPU master to rebind later. For a weight ffid trains, ``m.weight`` is the
    effective tensor (it requires grad, and is not the Parameter), so both steps fail."""
    net = musubi.create_arch_network(1.0, None, None, None, None, tiny_wan_original(), ff="0.05", ffid="1")
    model = net._unet
    net.apply_to(None, model)
    m = model.blocks[0].self_attn.q
    assert m.weight.requires_grad  # the offloader's assertion would fire
    m.weight.data = m.weight.data.clone()  # its one-time copy into the pinned master: fine
    master = m.weight  # what it keeps as "the original Parameter object"
    with pytest.raises(TypeError):
        m.weight = master  # its rebind after each use (_bind): not a Parameter
    net.handle.detach()


def test_prepare_network_is_found_on_the_module():
    """musubi 0.3.4 calls network.prepare_network(args) only if hasattr(network_module, "prepare_network")."""
    import argparse

    assert callable(getattr(musubi, "prepare_network", None))
    net = musubi.create_arch_network(1.0, None, None, None, None, tiny_wan_original(), ff="0.05", ffid="1")
    with pytest.raises(ConfigError, match="drop --block_swap_h2d_only"):
        musubi.prepare_network(net, argparse.Namespace(block_swap_h2d_only=True, blocks_to_swap=1))


@pytest.mark.gpu
def test_gpu_block_swap_with_adamw8bit():
    """The seed's failure: block swap + AdamW8bit on a GPU. Proxies and their gradients stay on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    common = dict(
        device="cuda",
        mixed_precision="bf16",
        gradient_checkpointing=True,
        optimizer_type="AdamW8bit",
        optimizer_args=["min_8bit_size=16"],
        max_train_steps=3,
    )
    plain = run_training(_args(**common))
    swapped = run_training(_args(blocks_to_swap=2, **common))
    assert swapped.swaps > 4 and swapped.grad_devices_ok
    assert all(p.device.type == "cuda" for p in swapped.unwrapped.parameters())
    # the swapped blocks' weights really sit on the host between uses
    assert any(p.device.type == "cpu" for p in swapped.transformer.blocks[-1].parameters())
    a, b = plain.unwrapped.handle.trained_values(), swapped.unwrapped.handle.trained_values()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5)


# -- preservation through the network module -----------------------------------------------------
def _te_cache(folder, captions, dim=16):
    """musubi-style text-encoder cache files (``*_wan_te.safetensors``) for ``captions``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    for i, caption in enumerate(captions):
        text = torch.randn(5, dim, generator=g).to(torch.bfloat16)
        path = folder / f"item{i}_wan_te.safetensors"
        save_file({"varlen_t5_bf16": text}, str(path), {"caption1": caption})
    return folder


def test_preservation_keeps_protected_prompts_through_the_dit_output(tmp_path):
    """character2 (ffid 2) on top of character1: the preservation term musubi never sees is
    injected through the DiT's output, and keeps the protected prompt's predictions closer to
    base + character1 than a plain run does; only ffid 2's values train."""
    from safetensors import safe_open

    first = run_training(_args(max_train_steps=4))
    base1 = first.unwrapped.handle
    base1.merge()
    merged = {k: v.clone() for k, v in first.transformer.state_dict().items()}
    base1.detach()
    cache = _te_cache(tmp_path / "char1_cache", ["a photo of character1", ""])
    with safe_open(str(cache / "item0_wan_te.safetensors"), framework="pt") as f:
        context = f.get_tensor("varlen_t5_bf16").float()[None]

    def on_top(*preserve_args):
        model = tiny_wan_original()
        model.load_state_dict(merged)
        res = run_training(
            _args(network_args=["ff=0.05", "ffid=2", *preserve_args], max_train_steps=6, learning_rate=3e-2),
            transformer=model,
        )
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(8, 4, 1, 4, 4, generator=g), torch.rand(8, generator=g) * 1000
        handle = res.unwrapped.handle
        with torch.no_grad():
            student = model(x, t, context.expand(8, -1, -1))
            with handle.teacher() as teacher:
                target = teacher(x, t, context.expand(8, -1, -1))
        return res, float((student - target).pow(2).mean())

    plain, plain_drift = on_top()
    kept, kept_drift = on_top(f"preserve_cache={cache}", "preserve_weight=50", "preserve_items=2")
    assert kept_drift < 0.5 * plain_drift, (kept_drift, plain_drift)
    pres = kept.unwrapped.preservation
    assert pres.calls == 6 and set(pres.last) == {"distance", "a photo of character1", "<empty>"}
    assert plain.unwrapped.preservation is None
    sel1, sel2 = base1.selection, kept.unwrapped.handle.selection
    assert ffid.overlap(sel1, sel2) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["preserve_weight=2"], "protect earlier characters, but this run has none: give their deltas"),
        (["preserve_cache=NOWHERE"], "does not exist"),
        (["preserve_cache=EMPTY"], "holds no text encodings"),
        (["preserve_cache=CACHE", "preserve_weight=-1"], "preserve_weight = -1.0 must be a positive"),
        (["preserve_cache=CACHE", "preserve_prompts=unknown"], "'unknown' has no text encoding"),
        (["preserve_cache=CACHE", "preserve_wieght=1"], "did you mean 'preserve_weight'"),
    ],
)
def test_preservation_refusals(tmp_path, extra, message):
    cache = _te_cache(tmp_path / "cache", ["a photo of character1"])
    (tmp_path / "empty").mkdir()
    subs = {"NOWHERE": str(tmp_path / "nowhere"), "EMPTY": str(tmp_path / "empty"), "CACHE": str(cache)}
    for k, v in subs.items():
        extra = [e.replace(k, v) for e in extra]
    model = tiny_wan_original()
    before = _state(model)
    with pytest.raises(FfidError, match=message):  # ConfigError, MissingFileError for a missing folder
        run_training(_args(network_args=["ff=0.05", "ffid=2", *extra], max_train_steps=1), transformer=model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model).__name__ == "TinyWanModel" and not any(
        type(m).__name__.startswith("Ffid") for m in model.modules()
    )


def test_preservation_refuses_block_swap(tmp_path):
    cache = _te_cache(tmp_path / "cache", ["a photo of character1"])
    fix = r"preserve_method=projection selector=rows.*or drop --blocks_to_swap"
    with pytest.raises(ConfigError, match=fix):
        run_training(_args(network_args=["ff=0.05", "ffid=2", f"preserve_cache={cache}"], blocks_to_swap=1))
