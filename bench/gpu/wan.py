"""A Wan 2.x text-to-video DiT in plain torch modules, with the original checkpoint naming.

The GPU machine has no diffusers, so the GPU kit builds the model itself: every Linear, norm and
modulation table has the name and shape of ``ffid.presets.wan`` (checked by
``tests/test_gpu_kit.py``), so ffid selects, attaches and estimates exactly as it would on a real
checkpoint. What it leaves out costs little time and no parameters: rotary position embedding
(elementwise on q and k) and the sinusoidal timestep table's exact layout. Weights are random:
the kit measures memory and time, not quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ffid.presets.wan import WAN_CONFIGS, WanConfig


@dataclass(frozen=True)
class Clip:
    """A training sample's size: latent frames x latent rows x latent columns, and text tokens."""

    frames: int  # latent frames: (video frames - 1) // 4 + 1
    height: int  # latent rows (video height / 8)
    width: int  # latent columns (video width / 8)
    text_len: int = 512  # Wan's T5 context length

    @classmethod
    def video(cls, height: int, width: int, frames: int, text_len: int = 512) -> Clip:
        """The latent clip of a ``height x width`` video of ``frames`` frames (Wan 2.1 VAE)."""
        return cls((frames - 1) // 4 + 1, height // 8, width // 8, text_len)

    @property
    def tokens(self) -> int:
        return self.frames * (self.height // 2) * (self.width // 2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as Wan's own RMSNorm computes them
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, d = x.shape
        h = self.heads
        q = self.norm_q(self.q(x)).view(b, n, h, d // h).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel on CUDA
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.self_attn = Attention(d, cfg.num_heads)
        self.cross_attn = Attention(d, cfg.num_heads)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(d, eps=1e-6)  # cross_attn_norm: the one norm with weights
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # As the original Wan block: modulation and the residual stream in fp32 (so checkpointing
        # keeps fp32 block inputs, as ffid estimate assumes), the Linears under autocast.
        m = (self.modulation.float() + e.float()).chunk(6, dim=1)  # e: [B, 6, dim], time modulation
        x = x.float()
        y = self.self_attn(self.norm1(x) * (1 + m[1]) + m[0])
        x = x + y.float() * m[2]
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn(self.norm2(x) * (1 + m[4]) + m[3])
        return x + y.float() * m[5]


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + t.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    """Wan T2V DiT of config ``cfg`` (names and shapes of ``ffid.presets.wan.wan_shapes``)."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.checkpointing = False

    def forward(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(latents).flatten(2).transpose(1, 2)  # [B, tokens, dim]
        half = self.cfg.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        sin = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
        temb = self.time_embedding(sin.to(x.dtype))
        e = self.time_projection(temb).unflatten(1, (6, self.cfg.dim))
        context = self.text_embedding(text)
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                # per block, non-reentrant, as musubi-tuner and ffid train checkpoint
                x = checkpoint(block, x, e, context, use_reentrant=False)
            else:
                x = block(x, e, context)
        return self.head(x, temb)


def config(name: str, layers: int | None = None, **override: int) -> WanConfig:
    """The preset ``name``'s config, with ``layers`` blocks and other fields overridden."""
    base = WAN_CONFIGS[name]
    fields = {**base.__dict__, **override}
    if layers is not None:
        fields["num_layers"] = layers
    return WanConfig(**fields)


TOY = WanConfig(
    "toy Wan for the dry run",
    dim=64,
    ffn_dim=128,
    num_layers=2,
    num_heads=2,
    in_dim=16,
    out_dim=16,
    text_dim=32,
    freq_dim=16,
)


def build(
    cfg: WanConfig, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> WanDiT:
    """The model with random weights, made on ``device`` directly (a 14B model initialised on the
    CPU would take minutes): built on the meta device, then filled there."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    # dtype first (free on meta), so the device never holds an fp32 copy (57 GB for 14B)
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith("modulation"):
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in**0.5, generator=g)
            elif name.endswith("modulation"):
                p.normal_(0.0, 1.0 / cfg.dim**0.5, generator=g)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return model


def inputs(cfg: WanConfig, clip: Clip, device: torch.device | str, dtype: torch.dtype, seed: int = 1) -> dict:
    """One random sample of ``clip``'s size and a target of the output's size."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (1, cfg.in_dim, clip.frames, clip.height, clip.width)
    return {
        "latents": torch.randn(shape, generator=g, device=device, dtype=dtype),
        "t": torch.full((1,), 500.0, device=device),
        "text": torch.randn(1, clip.text_len, cfg.text_dim, generator=g, device=device, dtype=dtype),
        "target": torch.randn(1, clip.tokens, cfg.out_dim * math.prod(cfg.patch), generator=g, device=device),
    }


LORA_TARGETS = r".*blocks\.\d+\.((self_attn|cross_attn)\.(q|k|v|o)|ffn\.(0|2))"  # every Linear of a block


def lora_rank(model: nn.Module, trainable: int) -> int:
    """The LoRA rank on every block Linear whose trainable count is closest to ``trainable``."""
    import re

    per_rank = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and re.fullmatch(LORA_TARGETS, n)
    )
    return max(1, round(trainable / per_rank))


def add_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    """PEFT LoRA of ``rank`` on every block Linear; returns the trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params
