"""Round trips with the real engine: train -> save_delta -> merge into the base file -> load == trained.

(``apply_delta`` of a saved delta onto a fresh model is a matrix invariant: test_matrix.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import ffid
from ffid.engine import attach
from matrix import MODELS, loss_of


def _trained(kind: str, ffid_: int, steps: int = 3):
    model = MODELS[kind].build()
    handle = attach(model, ff=0.05, ffid=ffid_)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    for _ in range(steps):
        loss_of(model, MODELS[kind].batch(1)).backward()
        opt.step()
        opt.zero_grad()
    return model, handle


def _load(kind: str, folder):
    if kind == "wan":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(folder)
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder)


def _weights_file(folder):
    return next(p for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module", params=["wan", "gpt2"])
def trained_pair(request, tmp_path_factory):
    """Base model folder plus deltas of ids 1 and 2 trained by the engine, and their handles' states."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    base_model = MODELS[kind].build()
    base_model.save_pretrained(tmp / "base")
    states = {}
    for i in (1, 2):
        _, handle = _trained(kind, i)
        handle.save_delta(tmp / f"d{i}.safetensors", metadata={"ss_steps": "3"})
        states[i] = dict(handle.effective_state())
        handle.save_full(tmp / f"full{i}.safetensors")
    return kind, tmp, states


def test_train_save_delta_merge_load_equals_trained(trained_pair):
    kind, tmp, states = trained_pair
    out = tmp / "merged1"
    out.mkdir(exist_ok=True)
    base_file = _weights_file(tmp / "base")
    ffid.merge_checkpoint(base_file, [tmp / "d1.safetensors"], out / base_file.name)
    shutil.copy(tmp / "base" / "config.json", out / "config.json")
    loaded = _load(kind, out)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, states[1][k]), k
    # save_full wrote the same weights.
    full = load_file(str(tmp / "full1.safetensors"))
    merged = load_file(str(out / base_file.name))
    assert all(torch.equal(v, full[k]) for k, v in merged.items())


def test_ids_1_and_2_merge_in_either_order_to_the_same_file(trained_pair):
    _, tmp, _ = trained_pair
    base_file = _weights_file(tmp / "base")
    a, b = tmp / "a.safetensors", tmp / "b.safetensors"
    ffid.merge_checkpoint(base_file, [tmp / "d1.safetensors", tmp / "d2.safetensors"], a)
    ffid.merge_checkpoint(base_file, [tmp / "d2.safetensors", tmp / "d1.safetensors"], b)
    assert a.read_bytes() == b.read_bytes()
    merged = load_file(str(a))
    d1, d2 = ffid.load_delta(tmp / "d1.safetensors"), ffid.load_delta(tmp / "d2.safetensors")
    for name, t in d1.tensors.items():
        assert torch.equal(merged[name].reshape(-1)[t.indices], t.values)
    for name, t in d2.tensors.items():
        assert torch.equal(merged[name].reshape(-1)[t.indices], t.values)


def test_extract_then_merge_gives_tuned_bit_exactly(trained_pair):
    _, tmp, _ = trained_pair
    base_file = _weights_file(tmp / "base")
    tuned = tmp / "tuned.safetensors"
    ffid.merge_checkpoint(base_file, [tmp / "d1.safetensors", tmp / "d2.safetensors"], tuned)
    x = tmp / "x.safetensors"
    ffid.extract_delta(base_file, tuned, x)
    back = tmp / "back.safetensors"
    ffid.merge_checkpoint(base_file, [x], back)
    assert back.read_bytes() == tuned.read_bytes()


def test_resume_from_delta_restores_the_proxies(trained_pair):
    kind, tmp, states = trained_pair
    model = MODELS[kind].build()
    delta = ffid.load_delta(tmp / "d1.safetensors")
    handle = attach(model, ff=0.05, ffid=1)
    assert handle.selection.fingerprint == delta.info.selection_fingerprint
    handle.load_values(delta.values())
    state = dict(handle.effective_state())
    assert all(torch.equal(v, states[1][k]) for k, v in state.items())
