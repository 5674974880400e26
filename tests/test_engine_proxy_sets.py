"""``handle.use_proxies()``: one selection, several proxy sets (Wan 2.2's two experts).

Switching sets changes what forwards use, which proxies get gradients, what ``proxies()`` and
``base_values()`` return and what a saved delta holds; the handle's own set is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffid import attach
from ffid.checkpoint.delta import load_delta
from ffid.errors import MismatchError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8))


def test_a_second_set_is_trained_and_saved_on_its_own(tmp_path):
    model = _model()
    handle = attach(model, ff=0.05, ffid=1)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    own = {n: p.detach().clone() for n, p in handle.proxies()}
    keys = handle.proxy_keys()
    other_base = {n: v + 0.5 for n, v in handle.base_values().items()}
    other = {keys[n]: nn.Parameter(v.clone()) for n, v in other_base.items()}
    with torch.no_grad():
        before = model(x)
    handle.use_proxies(other, other_base)
    assert handle.base_values().keys() == other_base.keys()
    assert all(torch.equal(handle.base_values()[n], other_base[n]) for n in other_base)
    with torch.no_grad():
        assert not torch.equal(model(x), before)  # the other set's values are in use
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in other.values())
    assert all(p.grad is None for p in handle.parameters())  # the own set got nothing
    with torch.no_grad():
        for p in other.values():
            p.sub_(0.1 * p.grad)
    handle.save_delta(tmp_path / "other.safetensors")
    handle.use_proxies(None)
    handle.save_delta(tmp_path / "own.safetensors")
    with torch.no_grad():
        assert torch.equal(model(x), before)  # back to the own set, unchanged
    d_other, d_own = load_delta(tmp_path / "other.safetensors"), load_delta(tmp_path / "own.safetensors")
    for n in own:
        assert torch.equal(d_own.values()[n], own[n])
        assert torch.equal(d_other.values()[n], other[keys[n]].detach())
        assert d_other.info.base_fingerprint[n].hash != d_own.info.base_fingerprint[n].hash


def test_a_set_that_does_not_fit_is_refused():
    handle = attach(_model(), ff=0.05, ffid=1)
    keys = handle.proxy_keys()
    base = handle.base_values()
    short = {keys[n]: nn.Parameter(v[:-1].clone()) for n, v in base.items()}
    with pytest.raises(MismatchError, match="no fitting proxy"):
        handle.use_proxies(short, base)
    fitting = {keys[n]: nn.Parameter(v.clone()) for n, v in base.items()}
    with pytest.raises(MismatchError, match="base values of every"):
        handle.use_proxies(fitting, {})
