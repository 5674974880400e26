"""The diffusers recipe on tiny_wan: attach to pipe.transformer, train, save a delta, apply it."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

pytest.importorskip("diffusers")

from ffid.errors import ConfigError, MismatchError
from ffid.integrations.diffusers import apply_delta_to_pipeline, attach_to_pipeline, denoiser_of
from tiny_models import tiny_wan, tiny_wan_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _flow_step(transformer, seed: int) -> torch.Tensor:
    """One flow-matching loss on random latents, as diffusers' training examples compute it."""
    inputs = tiny_wan_inputs(seed=seed)
    noise = torch.randn_like(inputs["hidden_states"])
    sigma = (inputs["timestep"].float() / 1000).view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * inputs["hidden_states"] + sigma * noise
    pred = transformer(noisy, inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, noise - inputs["hidden_states"])


@torch.no_grad()
def _infer(transformer) -> torch.Tensor:
    inputs = tiny_wan_inputs(seed=42)
    return transformer(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The recipe: attach to pipe.transformer, train 3 steps, save the delta."""
    torch.manual_seed(0)
    pipe = SimpleNamespace(transformer=tiny_wan(), vae=None, text_encoder=None)
    handle = attach_to_pipeline(pipe, ff=0.05, ffid=1)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    for step in range(3):
        _flow_step(pipe.transformer, seed=step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    path = tmp_path_factory.mktemp("delta") / "character1.safetensors"
    handle.save_delta(path)
    return pipe, handle, path


def test_delta_applied_to_a_fresh_pipeline_reproduces_the_trained_model(trained):
    pipe, handle, path = trained
    fresh = SimpleNamespace(transformer=tiny_wan())
    assert not torch.allclose(_infer(fresh.transformer), _infer(pipe.transformer))
    result = apply_delta_to_pipeline(fresh, path)
    assert result.elements == handle.selection.selected
    torch.testing.assert_close(_infer(fresh.transformer), _infer(pipe.transformer), rtol=0, atol=1e-6)
    with pytest.raises(MismatchError, match="already applied"):
        apply_delta_to_pipeline(fresh, path)


def test_multiplier_scales_the_change(trained):
    _, handle, path = trained
    model = tiny_wan()
    apply_delta_to_pipeline(model, path, multiplier=0.5)
    trained_v, base_v = handle.trained_values(), handle.base_values()
    sd = model.state_dict()
    for name in trained_v:
        got = sd[name].reshape(-1)[handle.selection.indices(name)]
        torch.testing.assert_close(
            got, base_v[name] + 0.5 * (trained_v[name] - base_v[name]), rtol=0, atol=1e-7
        )


def test_diffusers_delta_merges_into_an_original_naming_checkpoint(trained, tmp_path):
    """Trained on diffusers names, baked into the ComfyUI / musubi layout by `ffid merge`."""
    from safetensors.torch import load_file, save_file

    from ffid.checkpoint.merge import merge_checkpoint
    from ffid.checkpoint.namemap import map_name

    _, handle, path = trained
    base = tiny_wan().state_dict()
    original = {
        f"model.diffusion_model.{map_name(k, 'diffusers', 'wan')}": v.contiguous() for k, v in base.items()
    }
    assert "model.diffusion_model.blocks.0.self_attn.q.weight" in original
    save_file(original, str(tmp_path / "wan_comfy.safetensors"))
    merge_checkpoint(tmp_path / "wan_comfy.safetensors", [path], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    expected = dict(handle.effective_state())
    assert len(merged) == len(expected)
    for k, v in expected.items():
        assert torch.equal(merged[f"model.diffusion_model.{map_name(k, 'diffusers', 'wan')}"], v), k


def test_denoiser_lookup():
    unet_pipe = SimpleNamespace(unet=torch.nn.Linear(2, 2))
    assert denoiser_of(unet_pipe) is unet_pipe.unet
    with pytest.raises(ConfigError, match="no transformer or unet"):
        denoiser_of(SimpleNamespace(vae=None))
