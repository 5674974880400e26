"""The sparse-gradient path for matrix-shaped weights (Linear, transformers' Conv1D, patch convs).

A :class:`Pattern` holds the selected positions of one weight viewed as a matrix ``[R, C]``:
a CSR layout (``crow`` / ``col``) and the flat indices, cached per device. :class:`SelectedMatmul`
is the autograd Function that computes ``y = x @ W_eff^T (+ b)`` (or ``x @ W_eff`` for Conv1D,
whose weight is stored ``[in, out]``), where ``W_eff`` is the base weight with the selected
positions replaced by the proxy values:

- forward: ``W_eff`` is materialised in the compute dtype, used, and dropped (never saved);
- backward: ``W_eff`` is rebuilt from ``module.weight`` *as it is at that moment* (block swap may
  have moved ``.data``), ``grad_x = gy @ W_eff`` densely, and the proxy gradient is only the
  selected entries of ``gy^T x``, computed by ``torch.sparse.sampled_addmm`` (SDDMM): no
  ``[R, C]`` gradient is ever allocated. Whole-tensor picks (compat-v2) use a dense matmul, since
  their gradient is the size of the proxy anyway.

Measured on CPU (one thread, process CPU time, 1024 tokens, a 1024x4096 weight, ff 0.01): SDDMM
12 ms with ``gy^T`` made contiguous first (19 ms without), a chunked gather-dot over the
(row, col) pairs 272 ms, the dense ``gy^T x`` it replaces 91 ms. So SDDMM is the path; the
gather-dot remains as a fallback for devices where SDDMM is not implemented.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The fp8 formats cannot be used in matmuls directly: they are upcast to the compute dtype, as
# musubi-tuner does for its fp8 base weights.
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


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


@dataclass
class _OnDevice:
    flat: torch.Tensor  # flat indices into W.reshape(-1)
    crow: torch.Tensor  # CSR row pointers [R + 1]
    col: torch.Tensor  # CSR column indices [k]


class Pattern:
    """Selected positions of a weight viewed as ``[rows, cols]``; indices cached per device.

    Indices are stored as int32 when the tensor has fewer than 2**31 elements, so the persistent
    cost on the compute device is 8 bytes per selected element (flat index + column).
    """

    def __init__(self, flat: torch.Tensor, rows: int, cols: int, whole: bool):
        self.rows, self.cols, self.whole = rows, cols, whole
        self.count = int(flat.numel())
        self._cpu = flat.to(torch.int64)
        self._cache: dict[torch.device, _OnDevice] = {}

    def on(self, device: torch.device) -> _OnDevice:
        found = self._cache.get(device)
        if found is None:
            itype = torch.int32 if self.rows * self.cols < 2**31 else torch.int64
            flat = self._cpu
            r = flat // self.cols
            crow = torch.zeros(self.rows + 1, dtype=torch.int64)
            crow[1:] = torch.bincount(r, minlength=self.rows).cumsum(0)
            found = _OnDevice(
                flat.to(device=device, dtype=itype),
                crow.to(device=device, dtype=itype),
                (flat % self.cols).to(device=device, dtype=itype),
            )
            self._cache[device] = found
        return found

    def drop_cache(self) -> None:
        self._cache.clear()

    def sampled_grad(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """fp32 vector of ``(a^T @ b)[r, c]`` for the selected ``(r, c)``, in selection order.

        ``a`` is ``[N, rows]`` and ``b`` is ``[N, cols]``. Accumulation is fp32, as a matmul
        under autocast would do.
        """
        a = a.float()
        b = b.float()
        if self.whole:
            return (a.t() @ b).reshape(-1)
        idx = self.on(a.device)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
                pattern = torch.sparse_csr_tensor(
                    idx.crow,
                    idx.col,
                    torch.zeros(self.count, dtype=torch.float32, device=a.device),
                    (self.rows, self.cols),
                    check_invariants=False,
                )
                # a.t() made contiguous: the kernel walks rows of mat1, 1.6x faster than strided.
                return torch.sparse.sampled_addmm(pattern, a.t().contiguous(), b, beta=0.0).values()
        except (RuntimeError, NotImplementedError):  # SDDMM missing on this device/build
            return self._gather_dot(a, b, idx)

    def _gather_dot(
        self, a: torch.Tensor, b: torch.Tensor, idx: _OnDevice, chunk: int = 8192
    ) -> torch.Tensor:
        at, bt = a.t().contiguous(), b.t().contiguous()
        rows = idx.flat.long() // self.cols
        cols = idx.col.long()
        out = torch.empty(self.count, dtype=torch.float32, device=a.device)
        for s in range(0, self.count, chunk):
            e = min(self.count, s + chunk)
            out[s:e] = (at.index_select(0, rows[s:e]) * bt.index_select(0, cols[s:e])).sum(1)
        return out


def effective_matrix(
    weight: torch.Tensor, proxy: torch.Tensor, pattern: Pattern, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``weight`` as ``[rows, cols]`` in ``dtype`` on ``device``, selected entries = proxy (a copy)."""
    if pattern.whole:
        return proxy.detach().to(device=device, dtype=dtype).view(pattern.rows, pattern.cols)
    w = weight.detach().to(device=device, dtype=dtype, copy=True).view(pattern.rows, pattern.cols)
    w.view(-1)[pattern.on(device).flat] = proxy.detach().to(device=device, dtype=dtype)
    return w


class SelectedMatmul(torch.autograd.Function):
    """``y = x @ W_eff^T + b`` (``transposed=False``) or ``y = x @ W_eff + b`` (``transposed=True``).

    ``get_weight`` returns the module's current base weight (read at call time, twice: in forward
    and again in backward). ``x`` is ``[N, in]``; ``bias`` may be ``None`` and may require grad
    (a selected bias, already made effective by the caller).
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
    ) -> torch.Tensor:
        cd = compute_dtype(x)
        with _no_autocast(x.device):
            w = effective_matrix(get_weight(), proxy, pattern, x.device, cd)
            xc = x.to(cd)
            b = bias.to(cd) if bias is not None else None
            y = torch.nn.functional.linear(xc, w.t() if transposed else w, b)
        del w
        ctx.save_for_backward(xc, proxy)
        ctx.get_weight, ctx.pattern, ctx.transposed = get_weight, pattern, transposed
        ctx.cd, ctx.x_dtype = cd, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.bias_device = bias.device if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):  # type: ignore[override]
        xc, proxy = ctx.saved_tensors
        pattern: Pattern = ctx.pattern
        gx = gp = gb = None
        with _no_autocast(gy.device):
            gyc = gy.to(ctx.cd)
            if ctx.needs_input_grad[0]:
                w = effective_matrix(ctx.get_weight(), proxy, pattern, gy.device, ctx.cd)
                gx = (gyc @ w.t() if ctx.transposed else gyc @ w).to(ctx.x_dtype)
                del w
            if ctx.needs_input_grad[1]:
                # Linear: W is [out, in] -> entries of gy^T x.  Conv1D: W is [in, out] -> x^T gy.
                a, b = (xc, gyc) if ctx.transposed else (gyc, xc)
                gp = pattern.sampled_grad(a, b).to(device=proxy.device, dtype=proxy.dtype)
            if ctx.needs_input_grad[2]:
                gb = gy.sum(0).to(device=ctx.bias_device, dtype=ctx.bias_dtype)
        return gx, gp, gb, None, None, None
