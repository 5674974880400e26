"""The engine on particular models and settings: dtypes, checkpointing, block swap, optimizers,
resume, errors, the matmul swap and index layout. The invariants every model and selector shares
(forward unchanged, equals masked full finetuning, detach, merge, delta round trip) are checked
once over the whole matrix in test_matrix.py."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ffid
from ffid import attach, plan
from ffid.errors import AttachError, MismatchError, TrainingError
from matrix import SELECTORS, loss_of, make, snapshot
from tiny_models import tiny_llama, tiny_mlp


def test_every_selected_element_can_change_with_weight_decay():
    model, sel, batch = make("gpt2", "spread")
    handle = attach(model, sel)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.5)
    for step in range(2):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
    base = handle.base_values()
    for name, trained in handle.trained_values().items():
        assert bool(((trained != base[name]) | (base[name] == 0)).all()), name


class _MatmulSpy(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.funcs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.funcs.append(str(func))
        if isinstance(out, torch.Tensor) and out.layout == torch.strided:  # sparse outputs hold k values
            self.shapes.append((str(func), tuple(out.shape)))
        return out


@pytest.mark.parametrize("sel_key", ["spread", "compat-v2"])
def test_no_full_size_weight_gradient_is_computed(sel_key):
    lin = torch.nn.Linear(64, 96)
    model = torch.nn.Sequential(lin, torch.nn.GELU(), torch.nn.Linear(96, 8))
    sel = plan(model, 0.04 if sel_key == "spread" else 0.5, 1 if sel_key == "spread" else 3, sel_key)
    # The sampled path's invariant (the dense paths make one weight-sized transient by design, see
    # test_engine_paths.py); at 16 tokens the cost model would pick dense here.
    handle = attach(model, sel, grad_path="sampled")
    x = torch.randn(16, 64, requires_grad=True)
    loss = model(x).pow(2).sum()
    spy = _MatmulSpy()
    with spy:
        loss.backward()
    matmuls = [s for f, s in spy.shapes if any(k in f for k in ("mm", "matmul", "linear", "sampled"))]
    sparse_weight = "0.weight" in sel and not sel["0.weight"].whole
    if sparse_weight:
        assert (96, 64) not in matmuls and (64, 96) not in matmuls, matmuls
        assert any("sampled_addmm" in f for f in spy.funcs)
    else:
        assert sel["0.weight"].whole and (96, 64) in matmuls  # whole tensor: dense, the proxy's size
    assert x.grad is not None and all(p.grad is not None for p in handle.parameters())


def test_bf16_base():
    model, sel, batch = make("wan", "spread")
    model.to(torch.bfloat16)
    handle = attach(model, sel)
    b = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch(1).items()}
    loss = loss_of(model, b)
    loss.float().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in handle.parameters())
    assert all(torch.isfinite(p.grad).all() for p in handle.parameters())


def test_fp8_base_keeps_exact_fp32_deltas():
    model, sel, batch = make("wan", "spread")
    model.to(torch.bfloat16)
    for m in model.blocks.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    handle = attach(model, sel)
    b = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in batch(1).items()}
    opt = torch.optim.SGD(handle.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, b)
    loss.float().backward()
    name = "blocks.0.ffn.net.0.proj.weight"
    grad = dict(handle.proxies())[name].grad.clone()
    opt.step()
    start = handle.base_values()[name]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the update is kept exactly in fp32, far below what fp8 could represent
    assert torch.equal(handle.trained_values()[name], start - 1e-3 * grad)
    # the stored weight stays fp8 (reading the attribute gives the effective tensor in fp32)
    proj = model.blocks[0].ffn.net[0].proj
    assert proj.weight.data.dtype == proj._parameters["weight"].dtype == torch.float8_e4m3fn
    assert proj.weight.dtype == torch.float32


def test_autocast_bf16_close_to_fp32():
    grads = []
    for autocast in (False, True):
        model, sel, batch = make("llama", "spread")
        handle = attach(model, sel)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(model, batch(1))
        loss.backward()
        grads.append(torch.cat([p.grad for p in handle.parameters()]))
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.98


def _grads(handle):
    return {n: p.grad.clone() for n, p in handle.proxies()}


def test_diffusers_gradient_checkpointing_matches():
    results = []
    for ckpt in (False, True):
        model, sel, batch = make("wan", "spread")
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        handle = attach(model, sel)
        loss_of(model, batch(1)).backward()
        results.append(_grads(handle))
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], msg=n)


def test_torch_checkpoint_matches():
    from torch.utils.checkpoint import checkpoint

    results = []
    for ckpt in (False, True):
        model, sel, batch = make("mlp", "spread")
        handle = attach(model, sel)
        if ckpt:
            for block in model.blocks:
                block.forward = (
                    lambda b: lambda x: checkpoint(torch.nn.Sequential.forward, b, x, use_reentrant=False)
                )(block)
        loss_of(model, batch(1)).backward()
        results.append(_grads(handle))
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], msg=n)


def _simulate_block_swap(model: torch.nn.Module) -> None:
    """What musubi's block swap does, on CPU: weights live elsewhere between uses and are
    swapped in by replacing ``.data`` under the same Parameter objects. Offloaded weights are
    NaN here, so any read outside the swapped-in window would poison the gradients."""
    for block in model.blocks:
        params = [p for p in block.parameters()]
        store = [p.data for p in params]

        def swap_in(*_args, params=params, store=store):
            for p, s in zip(params, store, strict=False):
                p.data = s.clone()  # a fresh "device" copy

        def swap_out(*_args, params=params, store=store):
            for p, s in zip(params, store, strict=False):
                p.data = torch.full_like(s, float("nan"))

        swap_out()
        block.register_forward_pre_hook(lambda m, a, f=swap_in: f())
        block.register_forward_hook(lambda m, a, o, f=swap_out: f())
        block.register_full_backward_pre_hook(lambda m, g, f=swap_in: f())
        block.register_full_backward_hook(lambda m, gi, go, f=swap_out: f())


@pytest.mark.parametrize("ckpt", [False, True])
def test_block_swap_simulation_matches(ckpt):
    results = []
    for swap in (False, True):
        model, sel, batch = make("wan", "spread")
        model.train()
        if ckpt:
            model.enable_gradient_checkpointing()
        handle = attach(model, sel)
        if swap:
            _simulate_block_swap(model)
        x = batch(1)
        x["hidden_states"].requires_grad_(True)  # full backward hooks need a grad-requiring input
        opt = torch.optim.AdamW(handle.parameters(), lr=1e-3)
        loss_of(model, x).backward()
        grads = _grads(handle)
        opt.step()
        results.append((grads, handle.trained_values()))
    for n in results[0][0]:
        torch.testing.assert_close(results[0][0][n], results[1][0][n], msg=n)
        torch.testing.assert_close(results[0][1][n], results[1][1][n], msg=n)


def test_gradient_accumulation_and_clipping():
    model, sel, batch = make("llama", "spread")
    handle = attach(model, sel)
    single = []
    for s in (1, 2):
        loss_of(model, batch(s)).backward()
        single.append(_grads(handle))
        handle.zero_grad()
    loss_of(model, batch(1)).backward()
    loss_of(model, batch(2)).backward()
    acc = _grads(handle)
    for n in acc:
        torch.testing.assert_close(acc[n], single[0][n] + single[1][n])
    norm = torch.nn.utils.clip_grad_norm_(handle.parameters(), max_norm=1e-3)
    assert norm > 1e-3
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in handle.parameters()]))
    assert total == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("model_key", ["wan", "gpt2"])
def test_resume_is_bit_identical(model_key):
    def run(steps, state=None):
        model, sel, batch = make(model_key, "spread")
        handle = attach(model, sel)
        opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
        if state is not None:
            handle.load_state_dict(state[0])
            opt.load_state_dict(state[1])
        for s in steps:
            loss_of(model, batch(s)).backward()
            opt.step()
            opt.zero_grad()
        return handle, opt

    straight, _ = run(range(6))
    first, opt = run(range(3))
    state = (copy.deepcopy(first.state_dict()), copy.deepcopy(opt.state_dict()))
    assert set(state[0]) == {p for p, _ in first.named_parameters()} | {"ffid_fingerprint"}
    resumed, _ = run(range(3, 6), state)
    for n, v in straight.trained_values().items():
        assert torch.equal(v, resumed.trained_values()[n]), n


def test_load_values_roundtrip_and_checks():
    model, sel, _ = make("llama", "spread")
    handle = attach(model, sel)
    values = {n: v + 1 for n, v in handle.trained_values().items()}
    handle.load_values(values)
    for n, v in handle.trained_values().items():
        assert torch.equal(v, values[n])
    with pytest.raises(MismatchError):
        handle.load_values({"nope.weight": torch.zeros(3)})
    name = next(iter(values))
    with pytest.raises(MismatchError):
        handle.load_values({name: torch.zeros(values[name].numel() + 1)})


# -- optimizers ----------------------------------------------------------------------------------
def _train_with(opt_factory, steps=3):
    model, sel, batch = make("wan", "spread")
    handle = attach(model, sel)
    opt = handle.guard(opt_factory(list(handle.parameters())))
    for s in range(steps):
        loss_of(model, batch(s)).backward()
        opt.step()
        opt.zero_grad()
    base = handle.base_values()
    moved = sum(int((v != base[n]).sum()) for n, v in handle.trained_values().items())
    return handle, moved


def test_bitsandbytes_adamw8bit_runs():
    bnb = pytest.importorskip("bitsandbytes")
    # 8-bit states only apply to tensors of >= 4096 elements: take a larger slice of the model
    model, _, batch = make("wan", "spread")
    sel = plan(model, 0.06, 0, "spread")
    handle = attach(model, sel)
    opt = handle.guard(bnb.optim.AdamW8bit(handle.parameters(), lr=1e-3, min_8bit_size=64))
    for s in range(2):
        loss_of(model, batch(s)).backward()
        opt.step()
        opt.zero_grad()
    base = handle.base_values()
    assert any((v != base[n]).any() for n, v in handle.trained_values().items())
    assert any("state1" in st and st["state1"].dtype == torch.uint8 for st in opt.state.values())


def test_adafactor_runs():
    from transformers.optimization import Adafactor

    _, moved = _train_with(lambda ps: Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False))
    assert moved > 0


def test_prodigy_runs():
    prodigyopt = pytest.importorskip("prodigyopt")
    _, moved = _train_with(lambda ps: prodigyopt.Prodigy(ps, lr=1.0))
    assert moved > 0


def test_bf16_proxies_with_stochastic_rounding():
    model, sel, batch = make("llama", "spread")
    handle = attach(model, sel, proxy_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in handle.parameters())
    opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=1e-3))
    for s in range(2):
        loss_of(model, batch(s)).backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.bfloat16 for p in handle.parameters())
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt.state.values())
    # unbiased: the mean of many stochastic roundings is the fp32 value
    x = torch.full((200_000,), 1.0 + 2**-10)
    r = ffid.engine.stochastic_round_bf16(x).float()
    assert set(r.unique().tolist()) <= {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)


# -- errors ---------------------------------------------------------------------------------------
def test_attach_twice_is_refused():
    model, sel, _ = make("mlp", "spread")
    handle = attach(model, sel)
    with pytest.raises(AttachError, match="already attached"):
        attach(model, sel)
    handle.detach()


def test_selection_for_another_model_is_refused_and_model_untouched():
    model, _, _ = make("gpt2", "spread")
    other = plan(tiny_llama(), 0.04, 1)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(MismatchError, match="another model"):
        attach(model, other)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks for m in model.modules())
    # same names, different shapes
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=2))
    with pytest.raises(MismatchError, match="shape"):
        attach(wider, plan(model, 0.04, 1))


def test_state_of_another_selection_is_refused():
    model, sel, _ = make("llama", "spread")
    handle = attach(model, sel)
    other_model, _, _ = make("llama", "spread")
    other = attach(other_model, plan(other_model, 0.04, 5))
    before = handle.trained_values()
    with pytest.raises(MismatchError, match="selection"):
        handle.load_state_dict(other.state_dict())
    state = handle.state_dict()
    del state["ffid_fingerprint"]
    with pytest.raises(MismatchError):
        handle.load_state_dict(state)
    for n, v in handle.trained_values().items():
        assert torch.equal(v, before[n])


def test_optimizer_with_base_weights_is_refused():
    model, sel, _ = make("mlp", "spread")
    handle = attach(model, sel)
    with pytest.raises(TrainingError, match="base weight"):
        handle.check_optimizer(torch.optim.SGD(list(model.parameters()), lr=0.1))
    with pytest.raises(TrainingError, match="misses"):
        handle.check_optimizer(torch.optim.SGD(list(handle.parameters())[:1], lr=0.1))


def test_nonfinite_gradients_raise_or_skip():
    model, sel, batch = make("mlp", "spread")
    handle = attach(model, sel)
    opt = handle.guard(torch.optim.SGD(handle.parameters(), lr=0.1))
    loss_of(model, batch(1)).backward()
    name, proxy = next(iter(handle.proxies()))
    proxy.grad[0] = float("nan")
    before = handle.trained_values()
    with pytest.raises(TrainingError, match=name.replace(".", r"\.")):
        opt.step()
    handle.on_nonfinite = "skip"
    opt.step()  # skipped: every gradient dropped, nothing written
    for n, v in handle.trained_values().items():
        assert torch.equal(v, before[n])
    with torch.no_grad():
        proxy[0] = float("inf")
    with pytest.raises(TrainingError, match="refusing merging"):
        handle.merge()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_describe_and_attach_arguments():
    model, _, _ = make("wan", "spread")
    handle = attach(model, ff=0.04, ffid=3)
    text = handle.describe()
    assert "trains" in text and "Linear" in text and "requires_grad=False" in text and "detach" in text
    assert handle.routes()["patch-conv"] == 1
    with pytest.raises(ffid.ConfigError):
        attach(tiny_mlp(), plan(tiny_mlp(), 0.04, 1), ff=0.1)


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    from ffid import attach
    from matrix import make
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    model, sel, batch = make("mlp", "spread")
    handle = attach(model, sel)
    ddp = torch.nn.parallel.DistributedDataParallel(handle)
    ddp(batch(1)["x"]).pow(2).mean().backward()  # calling the handle calls the model
    print(all(p.grad is not None for p in handle.parameters()))
    print(all(p.grad is None for p in model.parameters()))
    sys.stdout.flush()
    os._exit(0)  # no teardown of the group: see the test
    """
)


def test_ddp_wraps_the_handle(tmp_path):
    # In a process of its own that exits without destroying the group: the gloo worker thread
    # frees the backward's allreduce, whose captured thread-local state holds a Python object
    # (torch stashes a contextvars context during backward), and needs the GIL for that; tearing
    # the group down while the test holds the GIL deadlocked full test runs under load (gdb:
    # ~ProcessGroupGloo joining a worker thread that waits in take_gil).
    script = [sys.executable, "-c", _DDP_SCRIPT, str(tmp_path / "store"), str(Path(__file__).parent)]
    proc = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]


# -- the in-place swap of the matmul path and the index layout ------------------------------------
def test_in_place_swap_leaves_base_bit_identical_also_on_error(monkeypatch):
    model, sel, batch = make("wan", "spread")
    before = snapshot(model)
    versions = {n: p._version for n, p in model.named_parameters()}
    handle = attach(model, sel)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    for _ in range(2):
        loss_of(model, batch(1)).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the swap writes through .data: no version bump that would break graphs saving the weight
    assert {n: p._version for n, p in model.named_parameters()} == versions
    # an error inside the matmul (the proxies are swapped in at that moment) restores the base
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__)
    seen = []

    def failing_linear(x, w, b=None):
        seen.append(w.clone())
        raise RuntimeError("boom")

    with monkeypatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", failing_linear)
        with pytest.raises(RuntimeError, match="boom"):
            linear(torch.randn(3, linear.in_features))
    assert seen and not torch.equal(seen[0], linear.weight.data)  # it saw the trained values, not the base
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # and the forward really sees the trained values (not the restored base)
    trained = loss_of(model, batch(1)).item()
    handle.merge()
    handle.detach()
    assert loss_of(model, batch(1)).item() == pytest.approx(trained, rel=1e-6)


@pytest.mark.parametrize("sel_key", list(SELECTORS))
def test_indices_are_compact_and_only_on_the_compute_device(sel_key):
    model, sel, batch = make("wan", sel_key)
    handle = attach(model, sel)
    assert handle.index_tensors() == []  # built lazily where the forward runs, none at attach
    loss_of(model, batch(1)).backward()
    held = handle.index_tensors()
    partial = [p for p in sel.values() if not p.whole]
    budget = 4 * sum(p.count for p in partial) + 4 * sum(p.shape[0] + 1 for p in partial)
    assert sum(t.numel() * t.element_size() for t in held) <= budget
    assert all(t.dtype == torch.int32 for t in held)
    if not partial:
        assert held == []
    handle.detach()
    assert handle.index_tensors() == []
