"""Exact gradient paths for the selected entries of a matmul weight, and the fixed rule between them.

The proxy gradient of a matmul-path weight ``W`` (``[R, C]`` as stored) is the selected entries
of ``a^T @ b`` with ``a`` ``[N, R]`` and ``b`` ``[N, C]`` (``gy`` and ``x`` for a Linear, the
other way round for Conv1D), both already in the compute dtype. Three exact ways to get them:

- ``sampled``: ``torch.sparse.sampled_addmm`` (SDDMM) over the CSR pattern of the selection,
  ``N x k`` multiply-adds. The CPU kernel wants fp32 operands with ``a^T`` contiguous, so the
  tokens are walked in chunks of at most :data:`SAMPLED_CHUNK_BYTES` (per device type): each
  chunk is converted/transposed, accumulated into the ``k`` values, and dropped. No full fp32 or
  transposed copy of an activation is ever made.
- ``dense``: ``a^T @ b`` in the compute dtype (fp32 accumulation; fp32 output where the device
  offers it, e.g. CUDA ``out_dtype``), the ``k`` entries gathered, the product freed at once: one
  weight-sized transient, never stored, never a ``.grad``. ``N x R x C`` multiply-adds, but on
  tensor cores / a BLAS at full speed.
- ``chunked``: the dense product one block of output rows at a time (at most
  :data:`DENSE_BLOCK_BYTES` each), gathering each block's entries: the transient is bounded
  whatever the weight's size, for the same arithmetic.

All three give the same values to float tolerance (the dense paths round the product to the
compute dtype where the device has no fp32-output matmul, exactly as full finetuning's weight
gradient under autocast does). Whole-tensor picks use one dense fp32 product (their gradient
is the proxy's size anyway).

The choice (``auto``) is a fixed rule from the weight's shape, the selected count, the compute
dtype and the device type (:func:`auto_path`), so a layer's path, and with it the bits of its
gradient, never depends on timing, load, thread count or any cache: the same inputs give the same
path on every machine of a device type. ``dense`` is replaced by ``chunked`` when the product
would exceed :data:`DENSE_MAX_BYTES`. A path can always be forced: ``attach(...,
grad_path="dense")`` or the environment variable ``FFID_GRAD_PATH`` (the attach option wins).
"""

from __future__ import annotations

import os
import warnings

import torch

from ..errors import ConfigError
from .pattern import Pattern

PATHS = ("sampled", "dense", "chunked")
CHOICES = ("auto", *PATHS)
ENV_PATH = "FFID_GRAD_PATH"

# Transient bounds; ffid.estimate.ENGINE mirrors them (tested), without importing torch.
DENSE_MAX_BYTES = 256 * 2**20  # auto: a dense product above this runs chunked
DENSE_BLOCK_BYTES = 64 * 2**20  # chunked: one block of output rows at most this
SAMPLED_CHUNK_BYTES = {"cpu": 4 * 2**20, "default": 64 * 2**20}  # sampled: converted operands per chunk
CONVERT_BLOCK_BYTES = 512 * 2**10  # sampled, CPU: fp32 block of a 16-bit operand converted at once


def check_path(path: str | None) -> str | None:
    """``path`` if it is one of :data:`CHOICES` (or None), else a :class:`ConfigError`.

    Without ``path`` the environment's ``FFID_GRAD_PATH`` is checked too: attach calls this, so a
    bad value is refused before a run writes anything, not at its first backward.
    """
    if path is not None and path not in CHOICES:
        raise ConfigError(f"grad_path={path!r} is not one of {', '.join(CHOICES)}")
    requested(path)
    return path


def requested(forced: str | None) -> str:
    """The path asked for: the attach option, else ``FFID_GRAD_PATH``, else ``auto``."""
    if forced is not None:
        return forced
    env = os.environ.get(ENV_PATH, "").strip().lower()
    if not env:
        return "auto"
    if env not in CHOICES:
        raise ConfigError(f"{ENV_PATH}={env!r} is not one of {', '.join(CHOICES)}")
    return env


# -- the fixed rule ----------------------------------------------------------------------------
# What one sampled multiply-add and one element converted to fp32 for the SDDMM cost, counted in
# dense multiply-adds of the compute dtype: (sampled, convert) per device type and dtype class.
# Fixed numbers, not measurements, so that the path depends on nothing but the call's inputs (a
# timed probe made the bits depend on the machine's load). The CPU pair is the geometric middle
# of two measured CPUs, one with bf16 instructions and one without (a bf16 product costs 1/4 of
# fp32's on one and 4x on the other), used for every dtype; the accelerator pairs (not measured:
# no GPU was lent) make tensor-core products win except at tiny ``ff``. docs/engine.md has the
# measurements.
AUTO_WEIGHTS: dict[tuple[str, str], tuple[int, int]] = {
    ("cpu", "fp32"): (8, 64),
    ("cpu", "16-bit"): (8, 64),
    ("default", "fp32"): (128, 64),
    ("default", "16-bit"): (1024, 512),
}


def auto_weights(dtype: torch.dtype, device_type: str) -> tuple[int, int]:
    """``(sampled, convert)`` of :data:`AUTO_WEIGHTS` for a compute dtype and device type."""
    kind = "16-bit" if dtype in (torch.bfloat16, torch.float16) else "fp32"
    return AUTO_WEIGHTS[("cpu" if device_type == "cpu" else "default", kind)]


def auto_path(rows: int, cols: int, count: int, dtype: torch.dtype, device_type: str) -> str:
    """The path ``auto`` takes for a ``[rows, cols]`` weight with ``count`` selected entries.

    Per token the dense product costs ``rows x cols`` multiply-adds; the SDDMM ``count`` sampled
    ones plus converting a token's operands (``a`` always; ``b`` too on the CPU, whose kernel
    wants it transposed, and elsewhere when it is not fp32). Both are linear in the token count,
    so the choice does not depend on it: one path per weight, dtype and device type. Integer
    arithmetic, so there is no rounding at the boundary either.
    """
    sampled, convert = auto_weights(dtype, device_type)
    b_copied = device_type == "cpu" or dtype != torch.float32
    copied = rows + (cols if b_copied else 0)
    if sampled * count + convert * copied < rows * cols:
        return "sampled"
    return "dense" if rows * cols * 4 <= DENSE_MAX_BYTES else "chunked"


def choose(pattern: Pattern, dtype: torch.dtype, device: torch.device, forced: str | None) -> str:
    """The path for one call: forced (attach option / env), else :func:`auto_path`."""
    path = requested(forced)
    if pattern.whole:
        return "dense"
    if path != "auto":
        return path
    return auto_path(pattern.rows, pattern.cols, pattern.count, dtype, device.type)


# -- the paths ----------------------------------------------------------------------------------
def _mm(at: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``at @ b`` with fp32 accumulation; fp32 output where the device has it for 16-bit inputs."""
    if at.dtype in (torch.bfloat16, torch.float16) and at.device.type == "cuda":
        try:
            return torch.mm(at, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return at @ b


def _sddmm(
    pattern: Pattern, col: torch.Tensor, at: torch.Tensor, b: torch.Tensor, values: torch.Tensor | None
) -> torch.Tensor:
    """``values + (at @ b)[selected]`` by SDDMM; ``at`` [R, n] contiguous fp32, ``b`` [n, C] fp32,
    ``col`` the CSR column indices (``flat % cols``)."""
    device = at.device
    if values is None:
        values = torch.zeros(pattern.count, dtype=torch.float32, device=device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = torch.sparse_csr_tensor(
            pattern.crow(device),
            col,
            values,
            (pattern.rows, pattern.cols),
            check_invariants=False,
        )
        return torch.sparse.sampled_addmm(csr, at, b).values()


def _fp32_t(x: torch.Tensor) -> torch.Tensor:
    """``x.t()`` as a contiguous fp32 tensor, the way the sampled path hands operands to the CPU
    kernel, without a second full fp32 copy (``x.t().float().contiguous()`` of a 16-bit ``x``
    makes one). A 16-bit ``x`` is converted a block of columns at a time (vectorised; at most
    :data:`CONVERT_BLOCK_BYTES` of fp32) and each block transposed into its rows of the result
    (torch's blocked transpose). Measured: 5-30% slower than the two full copies, against up to
    2x for one converting, transposing ``copy_``."""
    out = torch.empty((x.shape[1], x.shape[0]), dtype=torch.float32, device=x.device)
    if x.dtype == torch.float32:
        return out.copy_(x.t())
    step = max(16, CONVERT_BLOCK_BYTES // (4 * max(1, x.shape[0])))
    for c in range(0, x.shape[1], step):
        out[c : c + step] = x[:, c : c + step].float().t()
    return out


def _converted_t(x: torch.Tensor) -> torch.Tensor:
    """``x^T`` contiguous in fp32 (the SDDMM walks rows of its first operand: 1.6x faster)."""
    return _fp32_t(x) if x.device.type == "cpu" else x.t().float().contiguous()


def _operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``a^T`` (contiguous) and ``b`` for the SDDMM. The CPU kernel also walks rows of
    ``b^T`` and makes ``b^T`` contiguous itself: given the transpose view of a converted ``b^T``,
    it makes no second copy of the chunk."""
    return _converted_t(a), (_fp32_t(b).t() if b.device.type == "cpu" else b.float())


def sampled(pattern: Pattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``sampled`` path, tokens in chunks (bounded fp32/transposed copies)."""
    n = a.shape[0]
    budget = SAMPLED_CHUNK_BYTES.get(a.device.type, SAMPLED_CHUNK_BYTES["default"])
    step = max(64, budget // (4 * (pattern.rows + pattern.cols)))
    values = None
    col = pattern.flat(a.device) % pattern.cols  # transient, as the CSR pattern's column indices
    for s in range(0, n, step):
        at, bc = _operands(a[s : s + step], b[s : s + step])
        values = _sddmm(pattern, col, at, bc, values)
        del at, bc
    if values is None:
        return torch.zeros(pattern.count, dtype=torch.float32, device=a.device)
    return values


def dense(pattern: Pattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``dense`` path: one product in the compute dtype, the selected entries gathered."""
    if pattern.whole:  # the gradient is the proxy's size: one fp32 product
        return (a.t().float() @ b.float()).reshape(-1)
    prod = _mm(a.t(), b)
    out = prod.view(-1).index_select(0, pattern.flat(a.device)).float()
    del prod
    return out


def chunked(pattern: Pattern, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``chunked`` path: the dense product per block of output rows (bounded transient)."""
    out = torch.empty(pattern.count, dtype=torch.float32, device=a.device)
    flat = pattern.flat(a.device)
    for r0, r1, s, e in pattern.row_blocks(max(1, DENSE_BLOCK_BYTES // (4 * pattern.cols)), a.device):
        if s == e:
            continue
        prod = _mm(a[:, r0:r1].t(), b)
        local = flat[s:e] - r0 * pattern.cols
        out[s:e] = prod.view(-1).index_select(0, local).float()
        del prod
    return out


RUN = {"sampled": sampled, "dense": dense, "chunked": chunked}


_WARNED: set[str] = set()  # device types whose missing SDDMM was reported (once per process)


# How allocators word a failed allocation (CUDA's is a torch.OutOfMemoryError; the CPU's a plain
# RuntimeError from DefaultCPUAllocator).
_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(w in text for w in _OOM_WORDS)


def selected_grad(pattern: Pattern, a: torch.Tensor, b: torch.Tensor, path: str) -> torch.Tensor:
    """fp32 vector of ``(a^T @ b)[r, c]`` for the selected ``(r, c)``, in selection order.

    ``pattern.last_path`` is set to the path that really ran: where the SDDMM kernel is missing
    (a device or build without sparse CSR support) ``sampled`` runs ``chunked`` instead, with a
    warning, and says so. That depends on the build, not on load, so the bits stay fixed. An
    out-of-memory error is raised as it is: falling back would make the bits depend on how much
    memory happened to be free.
    """
    if pattern.whole:
        pattern.last_path = "dense"
        return dense(pattern, a, b)
    # The CSR row pointers (rows + 1 ints) are built whatever the path, so that what the engine
    # holds does not depend on the choice (the estimate counts them; chunked uses them too).
    pattern.crow(a.device)
    if path == "sampled":
        try:
            out = sampled(pattern, a, b)
        except (RuntimeError, NotImplementedError) as exc:
            if _out_of_memory(exc):
                raise
            if a.device.type not in _WARNED:
                _WARNED.add(a.device.type)
                why = " ".join(str(exc).split())[:200]
                warnings.warn(
                    f"ffid: the sampled gradient path failed on {a.device.type} ({why}); those "
                    f"weights run the chunked path instead (handle.grad_paths() says which; "
                    f"{ENV_PATH}=chunked avoids the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            path, out = "chunked", chunked(pattern, a, b)
        pattern.last_path = path
        return out
    pattern.last_path = path
    return RUN[path](pattern, a, b)


def transient_bytes(
    path: str, n: int, rows: int, cols: int, count: int, device_type: str = "cuda", whole: bool = False
) -> int:
    """Bytes the path allocates at once beyond its inputs and the ``count`` fp32 result."""
    if whole:
        return n * (rows + cols) * 4 + rows * cols * 4
    if path == "dense":
        return rows * cols * 4
    if path == "chunked":
        return min(rows, max(1, DENSE_BLOCK_BYTES // (4 * cols))) * cols * 4
    budget = SAMPLED_CHUNK_BYTES.get(device_type, SAMPLED_CHUNK_BYTES["default"])
    step = max(64, budget // (4 * (rows + cols)))
    return min(n, step) * (rows + cols) * 4
