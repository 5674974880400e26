"""The sparse-gradient path for matrix-shaped weights (Linear, transformers' Conv1D, patch convs).

A :class:`~ffid.engine.pattern.Pattern` holds the selected positions of one tensor (compact flat
indices per device, plus CSR row pointers when the tensor is used as a matrix ``[R, C]``), and
:func:`sampled_grad` computes its proxy gradient by a path of :mod:`ffid.engine.paths`.
:class:`SelectedMatmul` is the autograd Function that computes ``y = x @ W_eff^T (+ b)`` (or
``x @ W_eff`` for Conv1D, whose weight is stored ``[in, out]``), where ``W_eff`` is the base
weight with the selected positions replaced by the proxy values:

- forward: ``W_eff`` is formed for the matmul and never saved. When the base weight already has
  the compute dtype and device, the selected entries are swapped in place around the matmul and
  swapped back (:func:`effective_weight`: no weight-sized copy, the base is bit-identical after);
  otherwise (fp8/bf16 upcast, autocast, offloaded weight) the conversion copy takes the proxies;
- backward: ``W_eff`` is formed again from ``module.weight`` *as it is at that moment* (block swap
  may have moved ``.data``), ``grad_x = gy @ W_eff`` densely, and the proxy gradient is only the
  selected entries of ``gy^T x``, by one of the exact paths of :mod:`ffid.engine.paths` chosen
  per call (SDDMM over token chunks; a dense product in the compute dtype, gathered and freed at
  once; the same per block of rows): no ``[R, C]`` gradient is ever stored. Whole-tensor picks
  (compat-v2) use a dense matmul, since their gradient is the size of the proxy anyway.

A dense matmul plus a sparse correction (``x @ W^T + x @ D^T`` with ``D`` the CSR delta) was
measured too (CPU, one thread, 512 tokens, 512x2048 and 2048x512 weights, ff 0.01): 20-40%
slower than one dense matmul, against 1-3% for forming ``W_eff``, and not bit-equal to it.

Measured on CPU (one thread, process CPU time, 1024 tokens, a 1024x4096 weight, ff 0.01): SDDMM
12 ms with ``gy^T`` made contiguous first (19 ms without), a chunked gather-dot over the
(row, col) pairs 272 ms, the dense ``gy^T x`` it replaces 91 ms. At many tokens per width
or on tensor cores the dense product can win instead: :mod:`ffid.engine.paths` chooses per
call. The gather-dot remains as a fallback for devices where SDDMM is not implemented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..dtypes import fp8_dtypes
from . import paths
from .pattern import Pattern

# The fp8 formats cannot be used in matmuls directly: they are upcast to the compute dtype, as
# musubi-tuner does for its fp8 base weights.
FP8_DTYPES = fp8_dtypes()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would compute in for input ``x``: the autocast dtype if autocast is on.

    ``torch.amp.custom_fwd`` needs a fixed device type; the same Function serves CPU and CUDA
    here, so the autocast state is read per call and replayed explicitly in backward.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    if x.dtype.is_floating_point and x.dtype not in FP8_DTYPES:
        return x.dtype
    return torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    return torch.autocast(device.type, enabled=False)


def sampled_grad(pattern: Pattern, a: torch.Tensor, b: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """fp32 vector of ``(a^T @ b)[r, c]`` for the selected ``(r, c)`` of ``pattern``, in selection order.

    ``a`` is ``[N, rows]`` and ``b`` is ``[N, cols]``, in the compute dtype. Accumulation is
    fp32, as a matmul under autocast would do. ``path`` (see :mod:`ffid.engine.paths`) is
    chosen per call when not given (``pattern.grad_path`` forces one); the one that really ran
    is kept in ``pattern.last_path`` for reports and resume states.
    """
    if path is None:
        path = paths.choose(pattern, a.dtype, a.device, pattern.grad_path)
    return paths.selected_grad(pattern, a, b, path)


def effective_matrix(
    weight: torch.Tensor, proxy: torch.Tensor, pattern: Pattern, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``weight`` as ``[rows, cols]`` in ``dtype`` on ``device``, selected entries = proxy (a copy)."""
    if pattern.whole:
        return proxy.detach().to(device=device, dtype=dtype).view(pattern.rows, pattern.cols)
    w = weight.detach().to(device=device, dtype=dtype, copy=True).view(pattern.rows, pattern.cols)
    w.view(-1)[pattern.flat(device)] = proxy.detach().to(device=device, dtype=dtype)
    return w


@contextlib.contextmanager
def effective_weight(
    weight: torch.Tensor, proxy: torch.Tensor, pattern: Pattern, device: torch.device, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """``W_eff`` as ``[rows, cols]`` in ``dtype`` on ``device`` for the duration of the block.

    When the base weight already is what the matmul needs (same device and dtype, contiguous),
    the selected entries are swapped in place: the k base values are gathered, the proxies
    written, and the base values written back on exit (also on error), so the weight is bit for
    bit what it was once the block ends and no weight-sized copy is made. The write goes through
    ``.data``, which has its own version counter, so autograd graphs that saved the weight
    elsewhere are not invalidated (the values they see are restored before they run). Otherwise
    (fp8/bf16 base upcast, offloaded weight, autocast) the conversion is a copy anyway and the
    proxies are written into it (:func:`effective_matrix`).
    """
    if not pattern.whole and weight.device == device and weight.dtype == dtype and weight.is_contiguous():
        base = weight.data.view(-1)
        idx = pattern.flat(device)
        kept = base[idx]
        try:
            base[idx] = proxy.detach().to(device=device, dtype=dtype)
        except RuntimeError:  # e.g. an inference tensor: nothing was written, use a copy
            pass
        else:
            try:
                yield base.view(pattern.rows, pattern.cols)
            finally:
                base[idx] = kept
            return
    yield effective_matrix(weight, proxy, pattern, device, dtype)


# Switch for the activation recomputation below (tests compare runs with it on and off).
RECOMPUTE_ACTIVATIONS = True


def _saved_hooks_active() -> bool:
    """Whether default saved-tensor hooks are active (checkpointing, ``save_on_cpu``, ...).

    Reading a node's saved tensor then runs the hooks' unpack (non-reentrant checkpointing would
    recompute its whole region; offloading would copy back), and saving the source again packs
    a second copy, so the recomputation is not used. Unknown -> treated as active.
    """
    top = getattr(getattr(torch._C, "_autograd", None), "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except Exception:  # signature changed in another torch version
        return True


def _elementwise_sources(node: object, x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple] | None:
    # Only ops whose node saves every input needed to recompute ``x`` bit for bit: the same op
    # on the same tensors (same dtype, device, shape) gives the same values.
    name = type(node).__name__
    if name == "GeluBackward0":
        approximate = node._saved_approximate  # type: ignore[attr-defined]
        if not isinstance(approximate, str):
            return None
        src = (node._saved_self,)  # type: ignore[attr-defined]

        def fn(h: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(h, approximate=approximate)

    elif name == "SiluBackward0":
        src, fn = (node._saved_self,), torch.nn.functional.silu  # type: ignore[attr-defined]
    elif name == "MulBackward0":  # e.g. Llama's act(gate) * up, GPT-2's gelu_new
        src, fn = (node._saved_self, node._saved_other), torch.mul  # type: ignore[attr-defined]
        if not all(isinstance(t, torch.Tensor) for t in src):
            return None  # a side that needs no grad is not saved
        if torch.broadcast_shapes(src[0].shape, src[1].shape) != x.shape:
            return None
    else:
        return None
    for t in src:
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            return None
        if t.dim() == 0 or (len(src) == 1 and t.shape != x.shape):
            return None
    return fn, tuple(t.detach() for t in src)


def activation_sources(x: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple] | None:
    """How to recompute ``x`` from tensors its autograd node already saves, or ``None``.

    A Linear after an activation (Wan's FFN: ``gelu(h)`` [N, 4 dim]; Llama's ``silu(g) * u``)
    would otherwise keep ``x`` for its weight gradient on top of the ``h`` the activation's own
    node keeps. Saving that node's inputs instead (the same storages: no new memory) and
    recomputing the op in backward gives the same bits. ``x.grad_fn`` is the op that produced
    ``x``'s current value (an in-place change afterwards would replace it, and an in-place change
    of the sources trips autograd's version check). Anything unrecognised, any attribute missing
    in another torch version, or active saved-tensor hooks: ``None`` (save ``x`` as before).
    """
    if not RECOMPUTE_ACTIVATIONS or x.grad_fn is None or not x.dtype.is_floating_point:
        return None
    if _saved_hooks_active():
        return None
    try:
        return _elementwise_sources(x.grad_fn, x)
    except Exception:  # attribute missing/renamed, freed buffers, ...: fall back
        return None


class SelectedMatmul(torch.autograd.Function):
    """``y = x @ W_eff^T + b`` (``transposed=False``) or ``y = x @ W_eff + b`` (``transposed=True``).

    ``get_weight`` returns the module's current base weight (read at call time, twice: in forward
    and again in backward). ``x`` is ``[N, in]``; ``bias`` may be ``None`` and may require grad
    (a selected bias, already made effective by the caller). ``recompute`` (from
    :func:`activation_sources` on the un-reshaped input) makes it save the activation's sources
    instead of ``x`` and rebuild ``x`` in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        proxy: torch.Tensor,
        bias: torch.Tensor | None,
        get_weight: Callable[[], torch.Tensor],
        pattern: Pattern,
        transposed: bool,
        recompute: tuple[Callable[..., torch.Tensor], tuple] | None = None,
    ) -> torch.Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x.device):
            xc = x.to(cd)
            b = bias.to(cd) if bias is not None else None
            with effective_weight(get_weight(), proxy, pattern, x.device, cd) as w:
                y = torch.nn.functional.linear(xc, w.t() if transposed else w, b)
        if recompute is None:
            ctx.save_for_backward(proxy, xc)
            ctx.recompute = None
        else:
            ctx.save_for_backward(proxy, *recompute[1])
            ctx.recompute = recompute[0]
        ctx.get_weight, ctx.pattern, ctx.transposed = get_weight, pattern, transposed
        ctx.cd, ctx.x_dtype, ctx.in_features = cd, x.dtype, x.shape[-1]
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.bias_device = bias.device if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        proxy, *saved = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        gx = gp = gb = None
        with _no_autocast(gy.device):
            gyc = gy.to(ctx.cd)
            if ctx.recompute is None:
                xc = saved[0]
            else:  # the same op on the same tensors: x bit for bit, as forward had it
                xc = ctx.recompute(*saved).reshape(-1, ctx.in_features).to(ctx.cd)
            # The proxy gradient first: its transient (a contiguous copy of gy^T or x^T) is freed
            # before grad_x is allocated, so the two never add up at the backward peak.
            if ctx.needs_input_grad[1]:
                # Linear: W is [out, in] -> entries of gy^T x.  Conv1D: W is [in, out] -> x^T gy.
                a, b = (xc, gyc) if ctx.transposed else (gyc, xc)
                gp = sampled_grad(pattern, a, b).to(device=proxy.device, dtype=proxy.dtype)
                del a, b
            del xc  # grad_x does not need x: a recomputed x is freed before grad_x is allocated
            if ctx.needs_input_grad[0]:
                with effective_weight(ctx.get_weight(), proxy, pattern, gy.device, ctx.cd) as w:
                    gx = (gyc @ w.t() if ctx.transposed else gyc @ w).to(ctx.x_dtype)
            if ctx.needs_input_grad[2]:
                gb = gy.sum(0).to(device=ctx.bias_device, dtype=ctx.bias_dtype)
        return gx, gp, gb, None, None, None, None
