"""Every read of a touched tensor sees the trained values, through any code path.

musubi-tuner checkpoints *inside* each Wan block (``checkpoint(self._forward, ...)``) and its
``_forward`` reads ``self.modulation`` directly; other code reads ``self.q.weight`` in a helper
or runs compiled regions. The model here does all of that: a raw parameter read inside a
checkpointed helper, a Linear weight read with ``F.linear`` outside the Linear's forward, a norm
weight read by a helper method, plus ordinary module calls (Linear, LayerNorm, Embedding, biases).
Gradients must be the same with no checkpointing, block-level and model-level checkpointing,
and equal to full finetuning with the gradient masked to the selection.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ffid.engine import attach
from ffid.engine.reads import READS_KEY, EffectiveTensor

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, VOCAB = 16, 11


class ScaleNorm(nn.Module):
    """A norm whose weight is read by a helper method, not in ``forward`` itself."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def scale(self) -> torch.Tensor:
        return self.weight * 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.snorm = ScaleNorm(DIM)
        self.q = nn.Linear(DIM, DIM)
        self.ffn = nn.Sequential(
            nn.Linear(DIM, 2 * DIM), nn.GELU(approximate="tanh"), nn.Linear(2 * DIM, DIM)
        )
        self.modulation = nn.Parameter(torch.randn(1, 2, DIM) / DIM**0.5)
        self.checkpointing = False
        self.reentrant = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Wan's pattern: the raw Parameter is read here, inside the checkpointed function.
        e = self.modulation.to(torch.float32)
        h = self.norm(x) * (1 + e[:, 0]) + e[:, 1]
        h = F.linear(h, self.q.weight, self.q.bias)  # a Linear's weight read outside its forward
        h = self.q(torch.tanh(h))  # and the Linear's own forward (matmul path)
        return x + self.ffn(self.snorm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.checkpointing:
            return checkpoint(self._forward, x, use_reentrant=self.reentrant)
        return self._forward(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(DIM, 3)
        self.model_checkpointing = False

    def _blocks(self, h: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = b(h)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.training and self.model_checkpointing:
            h = checkpoint(self._blocks, h, use_reentrant=False)
        else:
            h = self._blocks(h)
        return self.head(h)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (3, 5), generator=g), torch.randn(3, 5, 3, generator=g)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    tokens, target = batch(step)
    return F.mse_loss(model(tokens), target)


def configure(model: Net, mode: str) -> None:
    model.model_checkpointing = mode == "model"
    for b in model.blocks:
        b.checkpointing = mode in ("block", "block-reentrant")
        b.reentrant = mode == "block-reentrant"


def run(mode: str, steps: int = 2):
    model = net()
    configure(model, mode)
    handle = attach(model, ff=0.05, ffid=1)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    grads = []
    for step in range(steps):
        loss_of(model, step).backward()
        grads.append({n: p.grad.clone() for n, p in handle.proxies()})
        opt.step()
        opt.zero_grad()
    return model, handle, grads


def test_every_route_is_selected():
    model, handle, _ = run("none", steps=0)
    names = {n for n, _ in model.named_parameters()}
    assert names - set(handle.selection) <= {"head.bias"}  # every tensor but a 3-element one is touched
    routes = handle.routes()
    assert routes["linear"] and routes["in-forward"] and routes["generic"]


@pytest.mark.parametrize("mode", ["block", "block-reentrant", "model"])
def test_checkpointing_gives_the_same_gradients_on_every_route(mode):
    _, h0, plain = run("none")
    _, h1, ckpt = run(mode)
    for step, (a, b) in enumerate(zip(plain, ckpt, strict=True)):
        for n in a:
            assert torch.equal(a[n], b[n]), (step, n)
            assert a[n].abs().sum() > 0, (step, n)  # no route silently gets no gradient
    a, b = h0.trained_values(), h1.trained_values()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gradients_equal_masked_full_finetuning_with_block_checkpointing():
    model = net()
    configure(model, "block")
    ref = copy.deepcopy(model)
    handle = attach(model, ff=0.05, ffid=1)
    loss_of(model, 0).backward()
    for p in ref.parameters():
        p.requires_grad_(True)
    loss_of(ref, 0).backward()
    sel = handle.selection
    for n, p in ref.named_parameters():
        if n not in sel:
            continue
        want = p.grad.reshape(-1)[sel[n].indices()]
        got = dict(handle.proxies())[n].grad
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=n)


def test_reads_return_effective_tensors_and_data_is_the_base():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    handle = attach(model, ff=0.05, ffid=1)
    with torch.no_grad():
        for _, p in handle.proxies():
            p.add_(1.0)
    block = model.blocks[0]
    for attr, base in (("modulation", block.modulation), ("norm", block.norm.weight), ("q", block.q.weight)):
        assert isinstance(base, EffectiveTensor), attr
    q = block.q
    eff = q.weight
    assert not torch.equal(eff, q._parameters["weight"])
    assert eff.requires_grad and eff.grad_fn is not None
    assert q.weight.data is not None and torch.equal(q.weight.data, q._parameters["weight"].data)
    # assigning .data through the attribute reaches the base Parameter (block swap does this)
    moved = q._parameters["weight"].data.clone()
    q.weight.data = moved
    assert q._parameters["weight"].data.data_ptr() == moved.data_ptr()
    # the model's own bookkeeping sees only the untouched base Parameters
    assert dict(model.named_parameters()) == params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # one read class per original class, with the original name
    assert type(model.blocks[0]) is type(model.blocks[1]) and type(model.blocks[0]).__name__ == "Block"
    assert isinstance(block.q, nn.Linear) and type(block.q).__name__ == "Linear"
    # results of operations are plain tensors
    assert type(eff * 2) is torch.Tensor
    # the base switch (for a teacher forward): reads and matmul forwards use the base
    tokens, _ = batch(0)
    handle._base_reads = True
    try:
        assert q.weight is q._parameters["weight"]
        base_out = model(tokens)
    finally:
        handle._base_reads = False
    handle.detach()
    assert torch.equal(model(tokens), base_out)


def test_detach_restores_classes_and_dicts():
    model = net()
    classes = {n: type(m) for n, m in model.named_modules()}
    dicts = {n: dict(m.__dict__) for n, m in model.named_modules()}
    handle = attach(model, ff=0.05, ffid=1)
    assert all(type(m) is not classes[n] for n, m in model.named_modules() if n.endswith(("q", "norm")))
    assert READS_KEY in model.blocks[0].__dict__
    handle.detach()
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: dict(m.__dict__) for n, m in model.named_modules()} == dicts
    assert isinstance(model.blocks[0].q.weight, nn.Parameter)


def _swap_through_attributes(model: Net) -> None:
    """musubi's swap style: ``module.weight.data`` read and assigned *through the attribute*;
    offloaded weights hold NaN, so any read outside the window poisons the gradients."""
    for block in model.blocks:
        mods = [m for m in block.modules() if getattr(m, "weight", None) is not None]
        store = [m.weight.data for m in mods]

        def swap_in(*_args, mods=mods, store=store):
            for m, s in zip(mods, store, strict=True):
                m.weight.data = s.clone()

        def swap_out(*_args, mods=mods, store=store):
            for m, s in zip(mods, store, strict=True):
                m.weight.data = torch.full_like(s, float("nan"))

        swap_out()
        block.register_forward_pre_hook(lambda m, a, f=swap_in: f())
        block.register_forward_hook(lambda m, a, o, f=swap_out: f())
        block.register_full_backward_pre_hook(lambda m, g, f=swap_in: f())
        block.register_full_backward_hook(lambda m, gi, go, f=swap_out: f())


@pytest.mark.parametrize("mode", ["none", "block"])
def test_swap_through_attribute_data_keeps_gradients(mode):
    _, _, plain = run(mode, steps=1)
    model = net()
    configure(model, mode)
    handle = attach(model, ff=0.05, ffid=1)
    _swap_through_attributes(model)
    loss_of(model, 0).backward()
    for n, p in handle.proxies():
        assert torch.equal(p.grad, plain[0][n]), n


def test_reads_inside_a_compiled_region():
    """A compiled helper reading a raw parameter, a norm and a Linear's weight directly sees the
    trained values with gradients (``aot_eager``: dynamo tracing, no C++ compiler needed)."""

    def run(compiled: bool):
        model = net()
        handle = attach(model, ff=0.05, ffid=1)
        with torch.no_grad():
            for _, p in handle.proxies():
                p.add_(0.01)
        blk = model.blocks[0]

        def helper(x: torch.Tensor) -> torch.Tensor:
            e = blk.modulation
            return F.linear(blk.norm(x) * (1 + e[:, 0]) + e[:, 1], blk.q.weight, blk.q.bias)

        fn = torch.compile(helper, backend="aot_eager") if compiled else helper
        x = torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(0))
        loss = fn(x).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in handle.proxies() if p.grad is not None}

    (loss_a, a), (loss_b, b) = run(False), run(True)
    assert torch.equal(loss_a, loss_b)
    assert a.keys() == b.keys() and len(a) == 5  # modulation, norm weight/bias, q weight/bias
    assert all(torch.equal(a[n], b[n]) for n in a)
