"""Scaled-fp8 Linear weights (musubi-tuner's ``--fp8_scaled``) trained by the engine.

The stand-in below quantizes Linear weights the way musubi's ``quantize_weight`` does (per
tensor, per output row, or per block of 64 columns: scale = max |w| / 448, fp8 = w / scale,
clamped) and patches the forward the way ``apply_fp8_monkey_patch`` does. The reference for
every check is a dense computation on the dequantized weight with the selected positions
replaced by the proxies.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from ffid import attach
from ffid.engine.scaled import dequantize, scale_at, values_at
from ffid.errors import AttachError, ConfigError

E4M3 = torch.float8_e4m3fn


def musubi_quantize(linear: nn.Linear, mode: str, dtype: torch.dtype) -> None:
    """Make ``linear`` a scaled-fp8 Linear as musubi's loader leaves it (scale in ``dtype``)."""
    w = linear.weight.detach().to(dtype)
    out, cols = w.shape
    if mode == "block":
        view = w.float().reshape(out, cols // 64, 64)
        scale = view.abs().amax(dim=2, keepdim=True) / 448.0
    elif mode == "channel":
        view = w.float()
        scale = view.abs().amax(dim=1, keepdim=True) / 448.0
    else:
        view = w.float()
        scale = (view.abs().max() / 448.0).reshape(1)
    scale = scale.clamp(min=1e-8)
    q = (view / scale).clamp(-448, 448).to(E4M3).reshape(out, cols)
    linear.weight = nn.Parameter(q, requires_grad=False)
    linear.register_buffer("scale_weight", scale.to(dtype))

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # musubi's patched forward
        return torch.nn.functional.linear(x, dequantize(self.weight, self.scale_weight), self.bias)

    linear.forward = types.MethodType(forward, linear)


class Net(nn.Module):
    def __init__(self, mode: str, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(128, 192).to(dtype)
        self.down = nn.Linear(192, 64).to(dtype)
        self.head = nn.Linear(64, 8).to(dtype)  # stays unscaled, as musubi's head does
        musubi_quantize(self.up, mode, dtype)
        musubi_quantize(self.down, mode, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.down(torch.nn.functional.gelu(self.up(x)))))


MODES = ["block", "channel", "tensor"]


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(6, 128, generator=torch.Generator().manual_seed(3)).to(dtype)


def _dense(model: Net, handle, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference: dense weights (dequantized, proxies at the selected positions), autograd grads."""
    weights = {}
    for name, p in handle.proxies():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        base = module._parameters["weight"]
        w = dequantize(base, module.scale_weight).float() if hasattr(module, "scale_weight") else base.float()
        flat = w.reshape(-1).clone()
        idx = handle.selection.indices(name)
        leaf = p.detach().clone().requires_grad_(True)
        weights[name] = leaf
        weights[name + "#w"] = flat.index_put((idx,), leaf).reshape(base.shape)
    h = x.float()
    for layer in ("up", "down", "head"):
        module = getattr(model, layer)
        key = f"{layer}.weight"
        if key + "#w" in weights:
            w = weights[key + "#w"]
        elif hasattr(module, "scale_weight"):
            w = dequantize(module._parameters["weight"], module.scale_weight).float()
        else:
            w = module._parameters["weight"].float()
        h = torch.nn.functional.linear(h, w, module._parameters["bias"].float())
        if layer != "head":
            h = torch.nn.functional.gelu(h)
    h.square().mean().backward()
    return h.detach(), {n: t.grad for n, t in weights.items() if "#" not in n and t.grad is not None}


@pytest.mark.parametrize("mode", MODES)
def test_start_forward_and_teacher_equal_musubi_forward(mode):
    model = Net(mode, torch.float32)
    x = _x()
    musubi_forward = model.up.__dict__["forward"]
    with torch.no_grad():
        before = model(x)
    handle = attach(model, ff=0.05, ffid=1, selector="rows")
    assert handle.routes().get("scaled-linear") == 2
    with torch.no_grad():
        start = model(x)
        with handle.teacher():
            teacher = model(x)
    # proxies start at fp8 x scale: the run starts from exactly what musubi computes
    assert torch.equal(start, before) and torch.equal(teacher, before)
    handle.detach()
    assert model.up.__dict__["forward"] is musubi_forward
    with torch.no_grad():
        assert torch.equal(model(x), before)  # musubi's forward is back, weights untouched


@pytest.mark.parametrize("mode", MODES)
def test_gradient_and_values_match_a_dense_reference(mode):
    model = Net(mode, torch.float32)
    handle = attach(model, ff=0.05, ffid=2, selector="rows")
    opt = torch.optim.SGD(handle.parameters(), lr=0.5)
    x = _x()
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    ref, grads = _dense(model, handle, x)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
    for name, p in handle.proxies():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-7)
    # a generic read of module.weight, multiplied by the scale as musubi does, gives the proxies
    for layer in ("up", "down"):
        module = getattr(model, layer)
        idx = handle.selection.indices(f"{layer}.weight")
        read = module.weight.detach().reshape(-1)[idx] * scale_at(
            module.scale_weight, idx, module.weight.shape[1]
        )
        torch.testing.assert_close(
            read, dict(handle.proxies())[f"{layer}.weight"].detach(), rtol=1e-6, atol=0
        )


def test_file_values_are_the_start_and_the_fingerprinted_base(tmp_path):
    from ffid.checkpoint.delta import load_delta

    model = Net("block", torch.bfloat16)
    torch.manual_seed(0)  # the bf16 values before quantization: the "checkpoint file"
    file_up = nn.Linear(128, 192).to(torch.bfloat16).weight.detach()
    handle = attach(model, ff=0.05, ffid=1, selector="rows")
    idx = handle.selection.indices("up.weight")
    file_values = {"up.weight": file_up.reshape(-1)[idx].float()}
    fp8_values = values_at(model.up._parameters["weight"], model.up.scale_weight, idx)
    assert not torch.equal(file_values["up.weight"], fp8_values)  # fp8 rounding is real
    handle.set_base_values(file_values)
    assert torch.equal(dict(handle.proxies())["up.weight"].detach(), file_values["up.weight"])
    assert torch.equal(handle.base_values()["up.weight"], file_values["up.weight"])
    handle.save_delta(tmp_path / "d.safetensors")
    delta = load_delta(tmp_path / "d.safetensors")
    # untrained: the delta holds the file's values, so merging it into the file changes nothing
    assert torch.equal(delta.tensors["up.weight"].values, file_values["up.weight"])


def test_merge_writes_the_trained_values_into_the_fp8_domain():
    model = Net("channel", torch.float32)
    handle = attach(model, ff=0.05, ffid=1, selector="rows")
    with torch.no_grad():
        for _, p in handle.proxies():
            p.mul_(-0.7)  # inside every row's range: no clamping
    trained = {n: p.detach().clone() for n, p in handle.proxies()}
    handle.merge()
    handle.detach()
    for layer in ("up", "down"):
        module = getattr(model, layer)
        idx = handle.selection.indices(f"{layer}.weight")
        got = values_at(module._parameters["weight"], module.scale_weight, idx)
        # fp8 keeps 3 mantissa bits: within half a step (1/16 relative; subnormals 2**-10 x scale)
        want = trained[f"{layer}.weight"]
        tol = want.abs() / 16 + scale_at(module.scale_weight, idx, module.weight.shape[1]) * 2**-10
        assert bool(((got - want).abs() <= tol * 1.0001).all())
        assert float((got - want).abs().max()) < float(want.abs().max()) / 4  # really written


def test_refusals():
    model = Net("block", torch.float32)
    handle = attach(model, ff=0.05, ffid=1, selector="rows")
    with pytest.raises(ConfigError, match="fp8_scaled"):
        dict(handle.effective_state())
    handle.detach()
    model.up.scale_weight = torch.ones(7, 1)  # fits no musubi layout
    with pytest.raises(AttachError, match=r"scale_weight of shape \(7, 1\)"):
        attach(model, ff=0.05, ffid=1, selector="rows")
