"""The engine's shared invariants, once, over the whole test matrix (tests/matrix.py).

For every tiny model x selector (and gradient path / matmul route where the path matters):

- the forward is unchanged by attaching, and only the proxies receive gradients;
- gradients and updates equal full finetuning with the gradient masked to the selection;
- ``save_delta`` -> ``apply_delta`` on a fresh model gives the trained model bit for bit;
- ``detach`` restores the model bit for bit, with the same Parameter objects;
- ``merge`` gives the same weights as applying the saved delta.

PEFT's "only the adapter's parameters are updated" tests are the model; a check that only holds
for one model or selector belongs in test_engine.py, not here.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ffid import attach, plan
from ffid.checkpoint import apply_delta, load_delta
from ffid.engine import paths
from ffid.names import canonical_name
from matrix import (
    CASES,
    DEVICE,
    GRAD_PATHS,
    MODELS,
    ROUTES,
    loss_of,
    make,
    masks,
    path_cases,
    snapshot,
    to_device,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _adamw_steps(handle, model, batch, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(handle.parameters(), lr=lr)
    for step in range(steps):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()


# -- forward unchanged ------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_forward_unchanged_and_grads_only_on_proxies(model_key, sel_key):
    model, sel, batch = make(model_key, sel_key)
    ref = loss_of(model, batch(1)).item()
    handle = attach(model, sel)
    loss = loss_of(model, batch(1))
    assert loss.item() == pytest.approx(ref, rel=1e-6, abs=1e-6)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    names = dict(handle.proxies())
    assert set(names) == set(sel)
    for n, p in names.items():
        assert p.dtype == torch.float32 and p.numel() == sel[n].count
    assert sum(float(p.grad.abs().sum()) for p in handle.parameters()) > 0


def test_matrix_covers_every_route():
    """Each model takes the matmul routes the table says, and together they take every route."""
    seen = set()
    for key, spec in MODELS.items():
        model, sel, _ = make(key, "spread")
        handle = attach(model, sel)
        routes = set(handle.routes()) & set(ROUTES)
        handle.detach()
        assert routes == spec.routes, key
        seen |= routes
    assert seen == set(ROUTES)


# -- gradients and updates equal masked full finetuning ---------------------------------------------
def _full_ft_masked_sgd(model, sel, batch, lr):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    loss_of(ref, batch).backward()
    mk = masks(ref, sel)
    grads = {canonical_name(n): p.grad.clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p -= lr * p.grad * mk[name].to(p.device)
    return ref, grads


@pytest.mark.parametrize(("model_key", "sel_key", "grad_path"), path_cases())
def test_sgd_step_equals_masked_full_finetuning(model_key, sel_key, grad_path):
    # On DEVICE (FFID_TEST_DEVICE, default cpu), so bench/gpu/run.sh checks the same on CUDA.
    model, sel, batch = make(model_key, sel_key)
    model.to(DEVICE)
    lr = 0.5
    ref, ref_grads = _full_ft_masked_sgd(model, sel, to_device(batch(1)), lr)
    handle = attach(model, sel, grad_path=grad_path)
    opt = torch.optim.SGD(handle.parameters(), lr=lr)
    loss_of(model, to_device(batch(1))).backward()
    for n, p in handle.proxies():
        want = ref_grads[n].reshape(-1)[sel.indices(n).to(DEVICE)]
        torch.testing.assert_close(p.grad.reshape(-1), want, rtol=1e-5, atol=2e-6, msg=n)
    opt.step()
    got = dict(handle.effective_state())
    want = {canonical_name(k): v for k, v in ref.state_dict().items()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].to(DEVICE), want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("path", GRAD_PATHS)
def test_every_path_matches_the_dense_gradient(path: str, route: str, bf16: bool, monkeypatch) -> None:
    """Every gradient path on every matmul route, fp32 and bf16 autocast, on one-layer nets."""
    # Small bounds so that the sampled path walks several token chunks and the chunked path
    # several row blocks at these sizes.
    monkeypatch.setattr(paths, "SAMPLED_CHUNK_BYTES", {"cpu": 64 * 4 * 100, "default": 64 * 4 * 100})
    monkeypatch.setattr(paths, "DENSE_BLOCK_BYTES", 7 * 4 * 48)
    # On DEVICE (FFID_TEST_DEVICE, default cpu): on CUDA the dense paths use tensor cores and
    # the sampled path the CUDA SDDMM, so this is the check bench/gpu/run.sh runs there.
    model, x = ROUTES[route]()
    model, x = model.to(DEVICE), x.to(DEVICE)
    sel = plan(model, 0.05, 1, "spread")

    def run(m: torch.nn.Module) -> None:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            out = m(x)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        (out.float() * w).sum().backward()

    ref = copy.deepcopy(model)
    run(ref)
    grads = dict(ref.named_parameters())
    want = {n: grads[n].grad.reshape(-1)[sel.indices(n).to(DEVICE)].float() for n in sel}
    m = copy.deepcopy(model)
    handle = attach(m, sel, grad_path=path)
    run(m)
    assert handle.routes().get(route, 0) == 1
    weight = next(n for n in sel if n.endswith("weight"))
    assert handle.grad_paths()[weight] == path
    for n, p in handle.proxies():
        scale = want[n].abs().max().item()
        # bf16: full finetuning's gradient is itself rounded to bf16 (autocast's matmul output)
        tol = 1e-2 * scale if bf16 else 1e-5 * max(scale, 1.0)
        torch.testing.assert_close(p.grad, want[n], atol=tol, rtol=0)


@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_adamw_many_steps_only_selected_change(model_key, sel_key):
    model, sel, batch = make(model_key, sel_key)
    before = snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.0)
    mk = masks(ref, sel)

    handle = attach(model, sel)
    opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.0))
    for step in range(3):
        loss_of(model, batch(step)).backward()
        opt.step()
        opt.zero_grad()
        loss_of(ref, batch(step)).backward()
        for n, p in ref.named_parameters():
            p.grad *= mk[n]  # full finetuning with the gradient masked to the selection
        ref_opt.step()
        ref_opt.zero_grad()

    # base weights: same objects, bit-identical, no .grad
    assert {n: p for n, p in model.named_parameters()} == params_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    got = dict(handle.effective_state())
    base = handle.base_values()
    for k, v in ref.state_dict().items():
        mine = got[canonical_name(k)]
        if k.endswith("attn.c_attn.bias"):  # see the key bias below: its middle third is noise-driven
            keep = torch.ones(v.shape[0], dtype=torch.bool)
            keep[v.shape[0] // 3 : 2 * v.shape[0] // 3] = False
            mine, v = mine[keep], v[keep]
        torch.testing.assert_close(mine, v, rtol=1e-4, atol=1e-5, msg=k)
    for name, trained in handle.trained_values().items():
        moved = trained != base[name]
        # AdamW moves every element with a nonzero gradient; embeddings of tokens absent from the
        # batches (and similar) get none, so only "most" is required there, "all" elsewhere.
        if "wte" in name or "wpe" in name or "embed_tokens" in name:
            assert moved.float().mean() > 0.2, name
            continue
        if name.endswith("attn.c_attn.bias"):
            # GPT-2's key bias: softmax ignores a shift shared by all keys, so its gradient is zero
            # or rounding noise depending on the attention kernel, and Adam turns noise into a
            # full step. Its values are checked against the reference above; skip it here.
            width = sel[name].shape[0] // 3
            idx = sel.indices(name)
            moved = moved[(idx < width) | (idx >= 2 * width)]
        assert bool(moved.all()), name


# -- save_delta -> apply_delta ------------------------------------------------------------------------
@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_save_delta_then_apply_delta_gives_the_trained_model(tmp_path, model_key, sel_key):
    model, sel, batch = make(model_key, sel_key)
    handle = attach(model, sel)
    _adamw_steps(handle, model, batch, steps=2)
    path = tmp_path / "d.safetensors"
    handle.save_delta(path)
    trained = dict(handle.effective_state())
    assert load_delta(path).info.selection_fingerprint == sel.fingerprint
    fresh = MODELS[model_key].build()
    assert apply_delta(fresh, path).elements == sel.selected
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, trained[canonical_name(k)]), k


# -- detach -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_detach_restores_exactly(model_key, sel_key):
    model, sel, batch = make(model_key, sel_key)
    if model_key == "mlp":
        model.blocks[0].requires_grad_(False)  # flags other than all-True are restored too
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    flags = {n: p.requires_grad for n, p in params.items()}
    before = snapshot(model)
    modules = {
        n: (dict(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks))
        for n, m in model.named_modules()
    }
    out_before = loss_of(model, batch(1)).item()
    handle = attach(model, sel)
    _adamw_steps(handle, model, batch, steps=2)
    assert loss_of(model, batch(1)).item() != out_before
    handle.detach()
    assert dict(model.named_parameters(remove_duplicate=False)) == params
    assert {n: p.requires_grad for n, p in params.items()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for n, m in model.named_modules():
        assert (dict(m.__dict__), len(m._forward_pre_hooks), len(m._forward_hooks)) == modules[n], n
    assert loss_of(model, batch(1)).item() == out_before
    handle.detach()  # a second detach is a no-op
    attach(model, sel).detach()  # and the model can be attached again


# -- merge equals apply -------------------------------------------------------------------------------
@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_merge_equals_apply(tmp_path, model_key, sel_key):
    model, sel, batch = make(model_key, sel_key)
    params = dict(model.named_parameters(remove_duplicate=False))
    handle = attach(model, sel)
    _adamw_steps(handle, model, batch, steps=1)
    attached_loss = loss_of(model, batch(2)).item()
    delta = tmp_path / "d.safetensors"
    handle.save_delta(delta)
    state = dict(handle.effective_state())
    base = handle.base_values()
    handle.merge()
    handle.detach()
    assert loss_of(model, batch(2)).item() == pytest.approx(attached_loss, rel=1e-6)
    applied = MODELS[model_key].build()
    apply_delta(applied, delta)
    want = applied.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
        assert torch.equal(v, state[canonical_name(k)]), k
    # base values are still those from before training
    for n, v in handle.base_values().items():
        assert torch.equal(v, base[n])
    # the same Parameter objects, so tied weights (GPT-2's lm_head and wte) stay tied
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)


@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_the_base_fingerprint_is_taken_at_attach(tmp_path, model_key, sel_key):
    """``base_sample()`` is ``base_values()`` at the fingerprint's positions, and a delta's base
    fingerprint comes from it: weights that change after attach (as a block caught mid-exchange
    by block swap would look) do not reach the file, so it still merges into the real base."""
    from ffid.checkpoint.delta_format import sample_positions

    model, sel, batch = make(model_key, sel_key)
    handle = attach(model, sel)
    sample = handle.base_sample()
    for n, v in handle.base_values().items():
        assert torch.equal(sample[n], v[sample_positions(v.numel())]), n
    _adamw_steps(handle, model, batch, steps=1)
    handle.save_delta(tmp_path / "clean.safetensors")
    with torch.no_grad():  # the module's own weights, not the proxies
        for p in model.parameters():
            p.add_(1.0) if p.is_floating_point() else None
    handle.save_delta(tmp_path / "moved.safetensors")
    handle.detach()
    clean, moved = (load_delta(tmp_path / f"{n}.safetensors") for n in ("clean", "moved"))
    assert moved.info.base_fingerprint == clean.info.base_fingerprint
    apply_delta(MODELS[model_key].build(), tmp_path / "moved.safetensors")  # checks the fingerprint
