"""Scaled-fp8 Linear weights (musubi-tuner's ``--fp8_scaled``): what their values are, and how to
write one.

musubi quantizes each Linear weight of the DiT's blocks to ``float8_e4m3fn`` and registers a
``scale_weight`` buffer on the module in the checkpoint's own dtype (bf16/fp16); its forward
uses ``weight.to(scale.dtype) * scale``. The scale has one of three shapes:

- ``[1]`` (per tensor) or ``[out, 1]`` (per output row): broadcast over the weight;
- ``[out, blocks, 1]`` (per block of ``in / blocks`` columns of a row, musubi's default with 64
  columns per block): the weight is viewed as ``[out, blocks, in / blocks]`` to multiply.

ffid trains such a weight through the same matmul path as any other (the getter hands the
dequantized weight over, a transient of one weight as musubi's own forward makes), so the
selected positions hold the fp32 proxies exactly and every other position is what musubi
computes. A read of ``module.weight`` elsewhere sees the stored (fp8-domain) values with the
proxies divided by their scale, so code that multiplies by the scale gets the trained value.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_KEY = "scale_weight"
# the largest finite float8_e4m3fn value: musubi clamps to it when quantizing
E4M3_MAX = 448.0


def scale_of(module: nn.Module, attr: str = "weight") -> torch.Tensor | None:
    """The module's ``scale_weight`` buffer when ``attr`` is a scaled-fp8 Linear weight, else ``None``."""
    if attr != "weight" or not isinstance(module, nn.Linear):
        return None
    scale = module._buffers.get(SCALE_KEY)
    w = module._parameters.get("weight")
    if scale is None or w is None or w.element_size() != 1:
        return None
    return scale


def check_scale(name: str, weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why ``scale`` cannot scale ``weight`` (a message), or ``None`` when it can."""
    if weight.dim() != 2:
        return (
            f"{name} is a scaled fp8 weight of {weight.dim()} dimensions; only Linear matrices are supported"
        )
    out, cols = weight.shape
    shape = tuple(scale.shape)
    if shape in ((1,), ()) or shape == (out, 1):
        return None
    if len(shape) == 3 and shape[0] == out and shape[2] == 1 and shape[1] > 0 and cols % shape[1] == 0:
        return None
    return (
        f"{name} has a scale_weight of shape {shape} that does not fit its weight {tuple(weight.shape)} "
        "(expected [1], [out, 1] or [out, blocks, 1])"
    )


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight * scale`` in the scale's dtype, as musubi's scaled-fp8 forward computes it."""
    scale = scale.to(weight.device)
    w = weight.to(scale.dtype)
    if scale.dim() < 3:
        return w * scale
    out, blocks, _ = scale.shape
    return (w.reshape(out, blocks, -1) * scale).reshape(weight.shape)


def scale_at(scale: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """The scale of each flat position ``idx`` of a ``[rows, cols]`` weight (fp32, on ``idx``'s device)."""
    s = scale.to(device=idx.device, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(1).expand(idx.numel())
    rows = torch.div(idx, cols, rounding_mode="floor")
    if s.dim() < 3:
        return s.reshape(-1)[rows]
    blocks = s.shape[1]
    block = torch.div(idx - rows * cols, cols // blocks, rounding_mode="floor")
    return s.reshape(-1)[rows * blocks + block]


def values_at(weight: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The values musubi's forward uses at flat positions ``idx`` (fp32): ``fp8 * scale`` rounded to
    the scale's dtype, exactly as :func:`dequantize` gives them."""
    idx = idx.to(weight.device)
    raw = weight.reshape(-1)[idx].to(scale.dtype)
    s = scale_at(scale, idx, weight.shape[-1]).to(scale.dtype)
    return (raw * s).to(torch.float32)


def quantize_at(values: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, cols: int) -> torch.Tensor:
    """``values`` (true weights at flat positions ``idx``) in the fp8 domain: divided by their
    scale and clamped to the e4m3 range, as musubi quantizes (fp32, the caller casts)."""
    s = scale_at(scale, idx, cols).to(values.device)
    return (values.to(torch.float32) / s).clamp(-E4M3_MAX, E4M3_MAX)


def read_at(weight: torch.Tensor, scale: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """The values a weight stands for at flat positions ``idx`` (fp32): :func:`values_at` for a
    scaled weight, the stored values otherwise."""
    if scale is not None:
        return values_at(weight, scale, idx)
    return weight.reshape(-1)[idx.to(weight.device)].to(torch.float32)


@torch.no_grad()
def write_at(
    weight: torch.Tensor, scale: torch.Tensor | None, idx: torch.Tensor, values: torch.Tensor
) -> None:
    """Store the true ``values`` at flat positions ``idx`` of ``weight`` in place: quantized with its
    own scale for a scaled weight, rounded to the weight's dtype otherwise; 1-byte floats through a
    byte view (index_put is not implemented for them on every device)."""
    idx = idx.to(weight.device)
    if scale is not None:
        values = quantize_at(values.to(weight.device), scale, idx, weight.shape[-1])
    values = values.to(device=weight.device, dtype=weight.dtype)
    flat = weight.data.view(-1)
    if weight.element_size() == 1:
        flat.view(torch.uint8)[idx] = values.view(torch.uint8)
    else:
        flat[idx] = values
