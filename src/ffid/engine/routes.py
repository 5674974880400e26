"""The matmul path: which touched weights take it (their *route*) and the forwards that replace
their modules' ``forward`` while attached (step 4 of :mod:`ffid.engine.handle`'s docstring).

Routes: ``linear`` (``nn.Linear``), ``scaled-linear`` (an ``nn.Linear`` whose fp8 weight
musubi-tuner's ``--fp8_scaled`` scales, see :mod:`ffid.engine.scaled`), ``conv1d``
(transformers' GPT-2 ``Conv1D``), ``patch-conv``
(a conv whose stride equals its kernel, e.g. Wan's patch embedding), ``generic`` (every other use,
served by the effective-tensor reads of :mod:`ffid.engine.reads`) and ``in-forward`` (a bias
handled inside its module's matmul path). To add a route: detect it in :func:`matmul_route`,
write its forward here and register it in ``FORWARDS``. ``handle`` arguments are the
:class:`~ffid.engine.handle.FfidHandle` (not imported here: the handle imports this module).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .kernels import SelectedMatmul, activation_sources
from .scaled import dequantize, scale_of


def matmul_route(module: nn.Module, attr: str) -> str:
    """Which path a touched weight of ``module`` takes (see the module docstring)."""
    if scale_of(module, attr) is not None:
        # musubi's scaled-fp8 forward (an instance attribute) is replaced by the same product
        # with the proxies swapped in; the handle puts musubi's back on detach
        return "scaled-linear"
    if attr != "weight" or "forward" in module.__dict__:
        return "generic"  # someone else already patched this forward: respect it via the generic path
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module._parameters[attr].dim() == 2:
        return "conv1d"  # transformers' GPT-2 style layer: y = x @ W + b with W [in, out]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and type(module).forward in (
        nn.Conv1d.forward,
        nn.Conv2d.forward,
        nn.Conv3d.forward,
    ):
        pad = module.padding
        no_pad = pad == "valid" or (not isinstance(pad, str) and all(p == 0 for p in pad))
        if (
            tuple(module.stride) == tuple(module.kernel_size)
            and no_pad
            and all(d == 1 for d in module.dilation)
            and module.groups == 1
            and not module.transposed
        ):
            return "patch-conv"
    return "generic"


def _getter(module: nn.Module, attr: str = "weight") -> Any:
    return lambda: module._parameters[attr]


def _scaled_getter(module: nn.Module) -> Any:
    # read at call time, like _getter: block swap moves the fp8 weight between devices
    return lambda: dequantize(module._parameters["weight"], module._buffers["scale_weight"])


def _base_matmul(module: nn.Module, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The layer's own forward on its base weight; an fp8 base (musubi's ``--fp8_base``) is first
    widened to the input's dtype, as the trained path does, because regions the model runs
    outside autocast (Wan's float32 time embedding) would otherwise multiply fp8 by float32."""
    w = module.weight  # in base reads: the base, as the class forward would read it
    if w is None or w.element_size() != 1 or not w.is_floating_point() or x.dtype == w.dtype:
        return type(module).forward(module, x)  # type: ignore[no-any-return]
    bias = getattr(module, "bias", None)
    b = bias.to(x.dtype) if bias is not None else None
    w = w.to(x.dtype)
    if transposed:  # transformers' Conv1D: W is [in, out]
        y = x @ w
        return y + b if b is not None else y
    return torch.nn.functional.linear(x, w, b)


def matmul_forward(
    handle: Any,
    module: nn.Module,
    slot: Any,
    bias_slot: Any | None,
    x: torch.Tensor,
    *,
    transposed: bool,
    getter: Any = None,
) -> torch.Tensor:
    if handle._base_reads:  # the class forward reads module.weight, which is then the base
        if getter is not None:  # a scaled weight: musubi's own product on the base
            return torch.nn.functional.linear(x, getter(), module._parameters.get("bias"))
        return _base_matmul(module, x, transposed)
    # nn.Linear stores W as [out, in] (y = x W^T); transformers' Conv1D as [in, out] (y = x W).
    rows, cols = module._parameters["weight"].shape  # the base: module.weight is the effective copy
    in_f, out_f = (rows, cols) if transposed else (cols, rows)
    lead = x.shape[:-1]
    y = SelectedMatmul.apply(
        x.reshape(-1, in_f),
        handle._proxy(slot),
        handle._bias(module, bias_slot),
        getter if getter is not None else _getter(module),
        handle._pattern(slot, rows, cols),
        transposed,
        activation_sources(x),  # read before the reshape hides the producing op
    )
    return y.reshape(*lead, out_f)


def patch_forward(
    handle: Any, module: nn.Module, slot: Any, bias_slot: Any | None, x: torch.Tensor
) -> torch.Tensor:
    if handle._base_reads:
        return type(module).forward(module, x)  # type: ignore[no-any-return]
    # stride == kernel, no padding: the conv is a Linear over non-overlapping patches.
    k = tuple(module.kernel_size)
    nd = len(k)
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    b, c = x.shape[:2]
    outs = [s // kk for s, kk in zip(x.shape[2:], k, strict=False)]
    x = x[(slice(None), slice(None), *(slice(0, o * kk) for o, kk in zip(outs, k, strict=False)))]
    split = [b, c]
    for o, kk in zip(outs, k, strict=False):
        split += [o, kk]
    perm = [0, *(2 + 2 * i for i in range(nd)), 1, *(3 + 2 * i for i in range(nd))]
    patches = x.reshape(split).permute(perm).reshape(b * math.prod(outs), c * math.prod(k))
    out_c = module._parameters["weight"].shape[0]
    pattern = handle._pattern(slot, out_c, c * math.prod(k))
    y = SelectedMatmul.apply(
        patches,
        handle._proxy(slot),
        handle._bias(module, bias_slot),
        _getter(module),
        pattern,
        False,
        None,  # a patch matrix is a reshaped copy of the conv input: nothing to recompute from
    )
    y = y.reshape(b, *outs, out_c).permute(0, nd + 1, *range(1, nd + 1)).contiguous()
    return y.squeeze(0) if unbatched else y


def linear_forward(
    handle: Any, module: nn.Module, slot: Any, bias_slot: Any | None, x: torch.Tensor
) -> torch.Tensor:
    return matmul_forward(handle, module, slot, bias_slot, x, transposed=False)


def scaled_linear_forward(
    handle: Any, module: nn.Module, slot: Any, bias_slot: Any | None, x: torch.Tensor
) -> torch.Tensor:
    return matmul_forward(handle, module, slot, bias_slot, x, transposed=False, getter=_scaled_getter(module))


def conv1d_forward(
    handle: Any, module: nn.Module, slot: Any, bias_slot: Any | None, x: torch.Tensor
) -> torch.Tensor:
    return matmul_forward(handle, module, slot, bias_slot, x, transposed=True)


# route -> forward(handle, module, slot, bias_slot, x)
FORWARDS = {
    "linear": linear_forward,
    "scaled-linear": scaled_linear_forward,
    "conv1d": conv1d_forward,
    "patch-conv": patch_forward,
}
