"""The musubi module on a DiT held in fp8 (plain ``--fp8_base``, which musubi's loader casts the
whole DiT to, and ``--fp8_scaled``): the trained elements start from the ``--dit`` file's values,
so the delta is exact against that file; ``--base_weights`` deltas are written into fp8 weights.

The real musubi-tuner runs ``--fp8_scaled`` in tests/test_musubi_real.py; plain ``--fp8_base``
cannot run there on a CPU (musubi's fp8 norms), so it is checked here on the stand-in DiT.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from ffid.checkpoint.delta import apply_delta, load_delta
from ffid.errors import ConfigError
from ffid.integrations import musubi
from musubi_harness import tiny_wan_original

FP8 = torch.float8_e4m3fn


def _fp8_dit(tmp_path):
    """A bf16 DiT file and the same DiT as musubi's --fp8_base loads it (cast to fp8)."""
    model = tiny_wan_original().to(torch.bfloat16)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.to(FP8)


def _network(model, path):
    net = musubi.create_arch_network(1.0, None, None, None, None, model, ff="0.05", ffid="2")
    net.prepare_network(argparse.Namespace(dit=str(path) if path else None, fp8_base=True))
    net.apply_to(None, model)
    return net


def test_fp8_base_starts_from_the_file_and_merges_exactly_into_it(tmp_path):
    path, model = _fp8_dit(tmp_path)
    net = _network(model, path)
    handle = net.handle
    file = load_file(str(path))
    for name, p in handle.proxies():
        idx = handle.selection.indices(name)
        want = file[name].reshape(-1)[idx].float()
        assert torch.equal(p.detach(), want), name  # the file's bf16 values, not their fp8 copies
        assert torch.equal(handle.base_values()[name], want)
    assert any(
        not torch.equal(file[n].reshape(-1)[handle.selection.indices(n)].to(FP8).float(), v)
        for n, v in handle.base_values().items()
    )  # the fp8 copies really differ
    with torch.no_grad():
        for _, p in handle.proxies():
            p.add_(0.01)
    net.save_weights(str(tmp_path / "c2.safetensors"))
    bf16 = tiny_wan_original().to(torch.bfloat16)
    bf16.load_state_dict(file)
    apply_delta(bf16, tmp_path / "c2.safetensors")  # verifies the base fingerprint against the file
    delta = load_delta(tmp_path / "c2.safetensors")
    got = dict(bf16.named_parameters())
    for name, t in delta.tensors.items():
        assert torch.equal(got[name].detach().reshape(-1)[t.indices], t.values.to(torch.bfloat16)), name


def test_base_weights_are_written_into_fp8_weights(tmp_path):
    _, model = _fp8_dit(tmp_path)
    first = _network(tiny_wan_original().to(torch.bfloat16), None)  # character 1 on a bf16 DiT
    with torch.no_grad():
        for _, p in first.handle.proxies():
            p.mul_(0.5)
    first.save_weights(str(tmp_path / "c1.safetensors"))
    weights = load_file(str(tmp_path / "c1.safetensors"))  # what musubi's --base_weights hands over
    network = musubi.create_arch_network_from_weights(1.0, weights, unet=model, for_inference=True)
    network.merge_to(None, model, weights, torch.bfloat16, "cpu")
    delta = load_delta(tmp_path / "c1.safetensors")
    params = dict(model.named_parameters())
    for name, t in delta.tensors.items():
        p = params[name]
        assert p.dtype == FP8
        assert torch.equal(
            p.detach().reshape(-1)[t.indices].view(torch.uint8), t.values.to(FP8).view(torch.uint8)
        )


def test_an_fp8_dit_without_a_dit_path_is_refused(tmp_path):
    _, model = _fp8_dit(tmp_path)
    with pytest.raises(ConfigError, match="pass --dit"):
        _network(model, None)
    assert not any(hasattr(m, "_ffid_reads") and m._ffid_reads for m in model.modules())  # left as it was
