"""The demo's tiny Wan DiT, its flow-matching loss and an Euler sampler.

The model is diffusers' ``WanTransformer3DModel`` (the Wan 2.1/2.2 architecture: patch embed,
self-attention with RoPE, cross-attention to text, time modulation), only small: an image is a
1-frame video of 1-channel 16x16 "latents". Training uses rectified flow as Wan does:
``x_t = (1 - t) x0 + t noise`` and the model predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .data import IMAGE_SIZE, TEXT_DIM, encode_prompt


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the demo DiT; stored next to the cached base so a changed spec is not mixed up."""

    dim: int = 64
    heads: int = 4
    layers: int = 4
    ffn_dim: int = 128
    freq_dim: int = 32
    text_dim: int = TEXT_DIM
    patch: int = 2
    channels: int = 1
    image_size: int = IMAGE_SIZE

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised ``WanTransformer3DModel`` of shape ``spec`` (deterministic in ``seed``)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=(1, spec.patch, spec.patch),
            num_attention_heads=spec.heads,
            attention_head_dim=spec.dim // spec.heads,
            in_channels=spec.channels,
            out_channels=spec.channels,
            text_dim=spec.text_dim,
            freq_dim=spec.freq_dim,
            ffn_dim=spec.ffn_dim,
            num_layers=spec.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=64,
        )
    return model


def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Velocity prediction for latents ``x`` [B, C, 1, H, W] at flow times ``t`` in [0, 1]."""
    # Wan's time embedding expects the scheduler's 0..1000 timestep scale.
    return model(x, t * 1000.0, text, return_dict=False)[0]


def flow_matching_loss(
    model: nn.Module, x0: torch.Tensor, text: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Rectified-flow MSE between the predicted and the true velocity ``noise - x0``."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tt) * x0 + tt * noise
    return torch.nn.functional.mse_loss(predict(model, xt, t, text).float(), (noise - x0).float())


@torch.no_grad()
def sample(
    model: nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance: float = 3.0,
    shift: float = 1.0,
    spec: ModelSpec | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Euler-integrate the flow from noise (t=1) to data (t=0); one image per (prompt, seed) pair.

    Classifier-free guidance mixes the prompt's and the empty prompt's velocities, as Wan's
    samplers do; ``shift`` bends the time grid like Wan's ``flow_shift``. Every image gets noise
    from its own seed, so a sample does not depend on what else is in the batch.
    Returns ``[len(prompts), C, 1, H, W]`` in model space.
    """
    spec = spec or ModelSpec()
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    shape = (spec.channels, 1, spec.image_size, spec.image_size)
    grid = torch.linspace(1.0, 0.0, steps + 1)
    grid = shift * grid / (1 + (shift - 1) * grid)
    empty = encode_prompt("").to(param.dtype)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        x = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(int(seeds[i]))) for i in chunk]
        )
        text = torch.stack([encode_prompt(prompts[i]) for i in chunk]).to(param.dtype)
        both_text = torch.cat([text, empty.expand_as(text)]) if guidance != 1.0 else text
        for k in range(steps):
            t, t_next = float(grid[k]), float(grid[k + 1])
            xin = torch.cat([x, x]) if guidance != 1.0 else x
            tv = torch.full((xin.shape[0],), t)
            v = predict(model, xin.to(param.dtype), tv.to(param.dtype), both_text).float()
            if guidance != 1.0:
                cond, uncond = v.chunk(2)
                v = uncond + guidance * (cond - uncond)
            x = x + (t_next - t) * v
        out.append(x)
    model.train(was_training)
    return torch.cat(out)


def param_count(model: nn.Module) -> int:
    """Every weight of ``model``, trained or not."""
    return sum(p.numel() for p in model.parameters())
