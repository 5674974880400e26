"""A fast stand-in for musubi-tuner's ``wan_train_network.py``.

The reference is the real trainer (``tests/test_musubi_real.py`` runs musubi-tuner v0.3.4's own
``wan_train_network`` in a separate environment); this stand-in stays because it runs in seconds,
in the test environment itself, and reaches what the real run cannot on CPU (CUDA block swap).

Two parts:

* :class:`TinyWanModel`: a Wan 2.x DiT in the *original* naming (``blocks.N.self_attn.q``,
  ``norm_q``, ``cross_attn``, ``norm3``, ``ffn.0``/``ffn.2``, ``modulation``, ``head.head``,
  ``head.modulation``, a Conv3d ``patch_embedding``, text/time embeddings), a few thousand
  parameters, with musubi's model-side hooks: ``enable_gradient_checkpointing``,
  ``enable_block_swap`` / ``move_to_device_except_swap_blocks`` / ``prepare_block_swap_before_forward``.
* :func:`run_training`: drives a network module in the order musubi-tuner 0.3.x does
  (see /work/shared/specs/musubi-network-module.md): ``create_arch_network`` -> ``prepare_network``
  -> ``apply_to`` -> ``load_weights`` -> gradient checkpointing -> ``prepare_optimizer_params`` ->
  optimizer -> ``network.to(dtype)`` (full_bf16) -> ``accelerator.prepare`` -> ``prepare_grad_etc``
  -> per epoch ``on_epoch_start`` / per step ``on_step_start``, backward, manual gradient mean
  over processes, clipping on ``get_trainable_params()``, optimizer step, max-norm, sampling,
  ``save_weights(file, dtype, metadata)`` and accelerate ``save_state`` / ``load_state``.

Block swap is simulated the way musubi's offloader does it: the ``.weight.data`` of every
sub-module of the last ``N`` blocks is exchanged through a shared "device" buffer (the buffer of
the block going out becomes the storage of the block coming in, the outgoing block gets a fresh
copy), around each block's forward *and* backward. Parameter objects never change; their data
storage does, which is exactly what breaks engines that cache ``param.data``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------------
# The model (original Wan naming)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyWanConfig:
    dim: int = 32
    ffn_dim: int = 64
    num_layers: int = 3
    num_heads: int = 2
    in_dim: int = 4
    out_dim: int = 4
    text_dim: int = 16
    freq_dim: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)


class WanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight.to(x.dtype)


class WanAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim)
        self.norm_k = WanRMSNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        b, n, d = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.o(y)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: TinyWanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = WanAttention(d, cfg.num_heads)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=True, eps=1e-6)
        self.cross_attn = WanAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        e = (self.modulation.to(e0.dtype) + e0).chunk(6, dim=1)  # 6 x [B, 1, D]
        x = x + self.self_attn(self.norm1(x) * (1 + e[1]) + e[0]) * e[2]
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + e[4]) + e[3]) * e[5]


class WanHead(nn.Module):
    def __init__(self, cfg: TinyWanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        m = (self.modulation.to(e.dtype) + e.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + m[1]) + m[0])


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class TinyWanModel(nn.Module):
    """A Wan T2V DiT in the original naming, small enough for CPU tests."""

    def __init__(self, cfg: TinyWanConfig | None = None):
        super().__init__()
        cfg = cfg or TinyWanConfig()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanAttentionBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self.gradient_checkpointing = False
        self.offloader: BlockSwapSimulator | None = None

    # -- musubi's model-side switches ----------------------------------------------------------
    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def enable_block_swap(
        self,
        blocks_to_swap: int,
        device: Any = "cpu",
        supports_backward: bool = True,
        use_pinned_memory: bool = False,
    ) -> None:
        self.offloader = BlockSwapSimulator(self.blocks, blocks_to_swap, torch.device(device))

    def move_to_device_except_swap_blocks(self, device: Any) -> None:
        self.to(device)
        if self.offloader is not None:
            self.offloader.reset()  # the swapped blocks' weights go back to the host

    def prepare_block_swap_before_forward(self) -> None:
        if self.offloader is not None:
            self.offloader.reset()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [B, C, F, H, W] latents, t: [B] timesteps, context: [B, L, text_dim] -> [B, C, F, H, W]."""
        cfg = self.cfg
        x = self.patch_embedding(x)  # [B, D, F, H/2, W/2]
        b, _, f, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, L, D]
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t).to(x.dtype))  # [B, D]
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))  # [B, 6, D]
        context = self.text_embedding(context)
        for i, block in enumerate(self.blocks):
            if self.offloader is not None:
                self.offloader.before_forward(i)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._run_block, i, x, e0, context, use_reentrant=False)
            else:
                x = block(x, e0, context)
            if self.offloader is not None and x.requires_grad:
                x.register_hook(self.offloader.backward_hook(i))
        x = self.head(x, e)  # [B, L, out * prod(patch)]
        pt, ph, pw = cfg.patch
        x = x.view(b, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, cfg.out_dim, f * pt, h * ph, w * pw)

    def _run_block(self, i: int, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Recomputation during backward goes through here again, so it must make the block resident.
        if self.offloader is not None:
            self.offloader.before_forward(i)
        return self.blocks[i](x, e0, context)


def tiny_wan_original(seed: int = 0, cfg: TinyWanConfig | None = None) -> TinyWanModel:
    """A deterministic :class:`TinyWanModel`."""
    torch.manual_seed(seed)
    return TinyWanModel(cfg)


class BlockSwapSimulator:
    """musubi's block swap: the last ``n`` blocks share one resident slot on ``device``.

    Making block ``i`` resident moves the current occupant out (its weights get a fresh storage on
    the host) and copies block ``i``'s weights into the freed device buffer, which then becomes the
    ``.data`` of block ``i``'s Parameters. Only ``.weight`` of sub-modules is swapped (as musubi does),
    biases and raw Parameters stay on the device. With ``device`` = CPU the "host" and "device" are
    two different CPU storages, which is what matters to an engine that might cache ``param.data``.
    """

    def __init__(self, blocks: nn.ModuleList, n: int, device: torch.device | None = None):
        if not 0 < n < len(blocks):
            raise ValueError(f"blocks_to_swap must be in 1..{len(blocks) - 1}")
        self.device = device or torch.device("cpu")
        self.host = torch.device("cpu")
        self.blocks = blocks
        self.swapped = list(range(len(blocks) - n, len(blocks)))
        self.resident: int | None = None
        self.swaps = 0
        self.reset()

    def _weights(self, i: int) -> list[nn.Parameter]:
        mods = self.blocks[i].modules()
        return [m.weight for m in mods if isinstance(getattr(m, "weight", None), nn.Parameter)]

    def reset(self) -> None:
        # Every swapped block starts "on the CPU" (own storage), the first one is made resident.
        for i in self.swapped:
            for p in self._weights(i):
                p.data = p.data.to(self.host, copy=True)
        self.resident = None
        self.ensure_resident(self.swapped[0])

    def ensure_resident(self, i: int) -> None:
        if i not in self.swapped or self.resident == i:
            return
        incoming = self._weights(i)
        if self.resident is None:
            for p in incoming:
                p.data = p.data.to(self.device, copy=True)  # the device buffer
        else:
            for p_out, p_in in zip(self._weights(self.resident), incoming, strict=True):
                buffer = p_out.data
                p_out.data = buffer.to(self.host, copy=True)  # device -> host, new storage
                buffer.copy_(p_in.data)  # host -> device into the shared buffer
                p_in.data = buffer
        self.resident = i
        self.swaps += 1

    def before_forward(self, i: int) -> None:
        self.ensure_resident(i)

    def backward_hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            self.ensure_resident(i)
            return grad

        return hook


# ------------------------------------------------------------------------------------------------
# The training driver
# ------------------------------------------------------------------------------------------------


def default_args(**overrides: Any) -> argparse.Namespace:
    """musubi-tuner's arguments that matter to a network module, with its defaults."""
    args = argparse.Namespace(
        network_module="ffid.integrations.musubi",
        network_args=None,
        network_dim=None,
        network_alpha=1.0,
        network_dropout=None,
        network_weights=None,
        dim_from_weights=None,
        base_weights=None,
        base_weights_multiplier=None,
        dataset_config=None,
        gradient_checkpointing=False,
        gradient_checkpointing_cpu_offload=False,
        learning_rate=1e-2,
        optimizer_type="AdamW",
        optimizer_args=None,
        mixed_precision="no",
        full_bf16=False,
        fp8_base=False,
        blocks_to_swap=0,
        max_grad_norm=1.0,
        scale_weight_norms=None,
        max_train_steps=4,
        gradient_accumulation_steps=1,
        save_every_n_steps=None,
        save_state=False,
        resume=None,
        output_dir=None,
        output_name="ffid-test",
        sample_every_n_steps=None,
        seed=1234,
        no_metadata=False,
        batch_size=2,
        device="cpu",
    )
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise AttributeError(f"unknown musubi argument {k}")
        setattr(args, k, v)
    return args


def make_batches(n: int, batch_size: int = 2, cfg: TinyWanConfig | None = None, seed: int = 7) -> list[dict]:
    """Deterministic latents / text states / timesteps / noise for ``n`` steps."""
    cfg = cfg or TinyWanConfig()
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(
            {
                "latents": torch.randn(batch_size, cfg.in_dim, 1, 4, 4, generator=g),
                "noise": torch.randn(batch_size, cfg.in_dim, 1, 4, 4, generator=g),
                "t": torch.rand(batch_size, generator=g) * 1000,
                "context": torch.randn(batch_size, 5, cfg.text_dim, generator=g),
            }
        )
    return out


def _device_of(transformer: nn.Module) -> torch.device:
    # patch_embedding is never swapped, so it tells where the model computes.
    return getattr(transformer, "module", transformer).patch_embedding.weight.device


def flow_loss(transformer: nn.Module, batch: dict, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """musubi's flow-matching loss: predict ``noise - latents`` from the interpolated input."""
    device = _device_of(transformer)
    batch = {k: v.to(device) for k, v in batch.items()}
    sigma = (batch["t"] / 1000).view(-1, 1, 1, 1, 1)
    noisy = (1 - sigma) * batch["latents"] + sigma * batch["noise"]
    target = batch["noise"] - batch["latents"]
    if compute_dtype is not None:
        with torch.autocast(device.type, dtype=compute_dtype):
            pred = transformer(noisy.to(compute_dtype), batch["t"], batch["context"].to(compute_dtype))
    else:
        pred = transformer(noisy, batch["t"], batch["context"])
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def sample(transformer: nn.Module, compute_dtype: torch.dtype | None = None, seed: int = 99) -> torch.Tensor:
    """A deterministic forward pass in eval mode, as musubi's sampling does mid-training."""
    device = _device_of(transformer)
    batch = {k: v.to(device) for k, v in make_batches(1, 1, seed=seed)[0].items()}
    was_training = transformer.training
    transformer.eval()
    try:
        x = batch["latents"]
        if compute_dtype is not None:
            with torch.autocast(device.type, dtype=compute_dtype):
                out = transformer(x.to(compute_dtype), batch["t"], batch["context"].to(compute_dtype))
                return out.float().cpu()
        return transformer(x, batch["t"], batch["context"]).float().cpu()
    finally:
        transformer.train(was_training)


@dataclass
class TrainResult:
    network: Any
    unwrapped: Any
    transformer: TinyWanModel
    optimizer: Any
    accelerator: Any
    losses: list[float] = field(default_factory=list)
    samples: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    load_info: Any = None
    grad_devices_ok: bool = True
    swaps: int = 0


def _get_optimizer(args: argparse.Namespace, params: Any) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {}
    for arg in args.optimizer_args or []:
        key, value = arg.split("=")
        kwargs[key] = json.loads(value)
    kind = args.optimizer_type.lower()
    if kind == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.learning_rate, **kwargs)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=args.learning_rate, **kwargs)
    module, _, name = args.optimizer_type.rpartition(".")
    cls = getattr(importlib.import_module(module or "torch.optim"), name)
    return cls(params, lr=args.learning_rate, **kwargs)


def build_network(args: argparse.Namespace, transformer: nn.Module, weight_dtype: torch.dtype) -> Any:
    """musubi's ``_build_network``: base_weights merge, create, prepare, apply_to, load_weights, ckpt."""
    from safetensors.torch import load_file

    network_module = importlib.import_module(args.network_module)
    for i, path in enumerate(args.base_weights or []):
        mult = 1.0
        if args.base_weights_multiplier is not None and len(args.base_weights_multiplier) > i:
            mult = args.base_weights_multiplier[i]
        weights_sd = load_file(path)
        module = network_module.create_arch_network_from_weights(
            mult, weights_sd, unet=transformer, for_inference=True
        )
        module.merge_to(None, transformer, weights_sd, weight_dtype, "cpu")

    net_kwargs = {}
    for net_arg in args.network_args or []:
        key, value = net_arg.split("=")
        net_kwargs[key] = value

    if args.dim_from_weights:
        weights_sd = load_file(args.dim_from_weights)
        network, _ = network_module.create_arch_network_from_weights(1, weights_sd, unet=transformer)
    elif hasattr(network_module, "create_arch_network"):
        network = network_module.create_arch_network(
            1.0,
            args.network_dim,
            args.network_alpha,
            None,
            None,
            transformer,
            neuron_dropout=args.network_dropout,
            **net_kwargs,
        )
    else:
        network = network_module.create_network(
            1.0, args.network_dim, args.network_alpha, None, None, transformer, **net_kwargs
        )
    if hasattr(network_module, "prepare_network"):
        network.prepare_network(args)
    network.apply_to(None, transformer, apply_text_encoder=False, apply_unet=True)
    info = None
    if args.network_weights is not None:
        info = network.load_weights(args.network_weights)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(args.gradient_checkpointing_cpu_offload)
        network.enable_gradient_checkpointing()
    return network, info


def run_training(
    args: argparse.Namespace,
    transformer: TinyWanModel | None = None,
    batches: list[dict] | None = None,
    on_step: Callable[[int, Any, TinyWanModel], None] | None = None,
    accelerator: Any = None,
) -> TrainResult:
    """Run musubi-tuner's network training sequence on ``transformer`` (a fresh tiny Wan by default)."""
    from accelerate import Accelerator

    torch.manual_seed(args.seed)
    if accelerator is None:
        accelerator = Accelerator(
            cpu=args.device == "cpu", gradient_accumulation_steps=args.gradient_accumulation_steps
        )
    compute_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    weight_dtype = compute_dtype or torch.float32
    if transformer is None:
        transformer = tiny_wan_original()
    if args.device != "cpu":
        transformer.to(accelerator.device)  # musubi loads onto the GPU unless blocks are swapped
    # musubi loads the DiT in its dtype (bf16 with --mixed_precision bf16), frozen, then block swap.
    if compute_dtype is not None:
        transformer.to(compute_dtype)
    transformer.eval()
    transformer.requires_grad_(False)
    if args.blocks_to_swap:
        transformer.enable_block_swap(args.blocks_to_swap, accelerator.device, supports_backward=True)
        transformer.move_to_device_except_swap_blocks(accelerator.device)

    network, info = build_network(args, transformer, weight_dtype)
    params, _lr_descriptions = network.prepare_optimizer_params(unet_lr=args.learning_rate)
    optimizer = _get_optimizer(args, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if args.full_bf16:
        network.to(weight_dtype)
    if args.fp8_base:
        transformer.to(torch.float8_e4m3fn)
    if args.blocks_to_swap:
        transformer = accelerator.prepare(transformer, device_placement=[False])
        accelerator.unwrap_model(transformer).prepare_block_swap_before_forward()
    else:
        transformer = accelerator.prepare(transformer)
    network, optimizer, scheduler = accelerator.prepare(network, optimizer, scheduler)
    if args.gradient_checkpointing:
        transformer.train()
    else:
        transformer.eval()
    unwrapped = accelerator.unwrap_model(network)
    unwrapped.prepare_grad_etc(transformer)

    result = TrainResult(network, unwrapped, transformer, optimizer, accelerator, load_info=info)

    def is_network(m: Any) -> bool:
        return isinstance(m, type(accelerator.unwrap_model(network)))

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            drop = [i for i, m in enumerate(models) if not is_network(m)]
            for i in reversed(drop):
                if len(weights) > i:
                    weights.pop(i)

    def load_model_hook(models: list, input_dir: str) -> None:
        drop = [i for i, m in enumerate(models) if not is_network(m)]
        for i in reversed(drop):
            models.pop(i)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    if args.resume:
        accelerator.load_state(args.resume)

    metadata = {
        "ss_session_id": "1",
        "ss_training_started_at": str(time.time()),
        "ss_output_name": args.output_name,
        "ss_learning_rate": str(args.learning_rate),
        "ss_base_model_version": "wan21_14b",
        "ss_network_module": args.network_module,
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha),
        "ss_mixed_precision": str(args.mixed_precision),
        "ss_seed": str(args.seed),
        "ss_optimizer": args.optimizer_type,
        "ss_fp8_base": str(bool(args.fp8_base)),
    }
    if args.network_args:
        metadata["ss_network_args"] = json.dumps(dict(a.split("=") for a in args.network_args))
    sai = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "wan2.1-t2v-14b/lora",
        "modelspec.title": args.output_name,
        "modelspec.date": "2025-01-01T00:00:00",
    }

    def save_model(name: str, step: int, epoch: int) -> None:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, name)
        md = dict(metadata, ss_steps=str(step), ss_epoch=str(epoch))
        md.update(sai)
        accelerator.unwrap_model(network).save_weights(path, weight_dtype, md)
        result.saved.append(path)

    batches = batches if batches is not None else make_batches(args.max_train_steps, args.batch_size)
    global_step = 0
    unwrapped.on_epoch_start(transformer)
    for batch in batches[: args.max_train_steps]:
        with accelerator.accumulate(network):
            accelerator.unwrap_model(network).on_step_start()
            loss = flow_loss(transformer, batch, compute_dtype)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if accelerator.num_processes > 1:
                    for param in network.parameters():
                        if param.grad is not None:
                            param.grad = accelerator.reduce(param.grad, reduction="mean")
                for p in unwrapped.get_trainable_params():
                    if p.grad is not None and (p.grad.device != p.device or p.grad.dtype != p.dtype):
                        result.grad_devices_ok = False
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(unwrapped.get_trainable_params(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if args.scale_weight_norms:
            unwrapped.apply_max_norm_regularization(args.scale_weight_norms, accelerator.device)
        global_step += 1
        result.losses.append(float(loss.detach()))
        if args.sample_every_n_steps and global_step % args.sample_every_n_steps == 0:
            result.samples.append((global_step, sample(transformer, compute_dtype)))
        if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
            save_model(f"{args.output_name}-step{global_step:08d}.safetensors", global_step, 1)
            if args.save_state:
                state_dir = os.path.join(args.output_dir, f"{args.output_name}-step{global_step:08d}-state")
                accelerator.save_state(state_dir)
                result.states.append(state_dir)
        if on_step is not None:
            on_step(global_step, unwrapped, transformer)
    if args.output_dir is not None:
        save_model(f"{args.output_name}.safetensors", global_step, 1)
    off = getattr(accelerator.unwrap_model(transformer), "offloader", None)
    result.swaps = off.swaps if off is not None else 0
    result.transformer = accelerator.unwrap_model(transformer)
    return result
