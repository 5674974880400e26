"""Raw safetensors reading and streaming writing, one tensor at a time.

The reader uses the offsets of the (validated) header and reads exactly one tensor's bytes, so
memory never holds more than the tensor at hand, and untouched tensors can be copied as bytes
without being decoded. The writer emits the header first (offsets are known from shapes and
dtypes) and then each tensor's bytes in header order, so a whole model is written with the
memory of its largest tensor.

Format reminder: 8-byte little-endian header length ``n``, ``n`` bytes of JSON (padded with
spaces to a multiple of 8), then the data; each entry's ``data_offsets`` are relative to the
start of the data and the entries tile it without gaps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..dtypes import DTYPE_BYTES, NUMPY_FLOAT, NUMPY_INT, numpy_storage, torch_dtype, torch_dtypes
from ..errors import ConfigError, ModelFileError
from ..manifest import read_safetensors_header
from ..names import canonical_name
from .atomic import atomic_write

if TYPE_CHECKING:
    import torch

# Large copies go through the kernel in chunks of this size (bounded, and cheap on any filesystem).
COPY_CHUNK = 64 * 1024 * 1024


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch ops single-threaded for a while (restored after).

    Streaming merges do scattered gathers/scatters over one tensor at a time: they gain nothing
    from intra-op threads and, on a busy machine, lose several times to thread contention
    (measured: 3-4x slower with 2 threads on a loaded 2-core box).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (made contiguous, on CPU), without a copy when possible."""
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: stored key, dtype code, shape and byte range in the data."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A validated safetensors file opened for random access reads (use as a context manager)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        header, self.metadata, self.data_start = read_safetensors_header(self.path)
        self.entries: dict[str, Entry] = {
            k: Entry(
                k,
                e["dtype"],
                tuple(int(d) for d in e["shape"]),
                int(e["data_offsets"][0]),
                int(e["data_offsets"][1]),
            )
            for k, e in header.items()
        }
        # Data order (by offset) is the order a streaming copy reads and writes in.
        self.order = sorted(self.entries.values(), key=lambda e: (e.start, e.end))
        self.by_canonical: dict[str, Entry] = {}
        for e in self.order:
            name = canonical_name(e.key)
            if name in self.by_canonical:
                raise ModelFileError(
                    f"{self.path}: keys {self.by_canonical[name].key!r} and {e.key!r} both mean tensor "
                    f"{name!r}; "
                    "the file mixes wrapped and unwrapped names, re-save it with one naming"
                )
            self.by_canonical[name] = e
        self.header_len = self.data_start - 8
        self.size = self.path.stat().st_size
        self._f: BinaryIO | None = None

    # -- file handle ---------------------------------------------------------------------------
    @property
    def f(self) -> BinaryIO:
        if self._f is None:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        return self._f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw_header(self) -> bytes:
        """The header bytes exactly as stored (length prefix included)."""
        return os.pread(self.f.fileno(), self.data_start, 0)

    # -- reads ---------------------------------------------------------------------------------
    def read_bytes(self, entry: Entry) -> np.ndarray:
        """The bytes of one tensor, in a fresh writable uint8 buffer (no torch needed)."""
        buf = np.empty(entry.nbytes, dtype=np.uint8)
        if entry.nbytes:
            got = os.preadv(self.f.fileno(), [buf], self.data_start + entry.start)
            while 0 < got < entry.nbytes:
                more = os.preadv(self.f.fileno(), [buf[got:]], self.data_start + entry.start + got)
                if more == 0:
                    break
                got += more
            if got != entry.nbytes:
                raise ModelFileError(f"{self.path} ended while reading {entry.key!r}; the file is truncated")
        return buf

    def read_tensor(self, entry: Entry | str) -> torch.Tensor:
        """One tensor, decoded, in its stored dtype and shape (writable, owns its memory)."""
        entry = self.entries[entry] if isinstance(entry, str) else entry
        buf = self.read_bytes(entry)
        return buffer_tensor(buf, entry.dtype, entry.shape)

    def read_flat_int(self, entry: Entry) -> torch.Tensor:
        """An integer tensor (any width, signed or not) as flat int64."""
        buf = self.read_bytes(entry)
        import torch

        return torch.from_numpy(buf.view(NUMPY_INT[entry.dtype]).astype(np.int64))

    def read_elements(self, entry: Entry, positions: Sequence[int]) -> torch.Tensor:
        """A few elements at flat ``positions`` as fp32, read without touching the rest of the tensor."""
        size = DTYPE_BYTES[entry.dtype]
        fd = self.f.fileno()
        buf = bytearray()
        for p in positions:  # a few dozen elements per tensor: single preads beat reading the tensor
            chunk = os.pread(fd, size, self.data_start + entry.start + int(p) * size)
            if len(chunk) != size:
                raise ModelFileError(f"{self.path} ended while reading {entry.key!r}; the file is truncated")
            buf += chunk
        import torch

        return buffer_tensor(buf, entry.dtype, (len(positions),)).to(torch.float32)

    def read_elements_f32(self, entry: Entry, positions: np.ndarray) -> np.ndarray:
        """Like :meth:`read_elements` but numpy fp32 (F32/F16/BF16 tensors; no torch needed)."""
        size = DTYPE_BYTES[entry.dtype]
        fd = self.f.fileno()
        chunks = []
        for p in positions.tolist():
            chunk = os.pread(fd, size, self.data_start + entry.start + p * size)
            if len(chunk) != size:
                raise ModelFileError(f"{self.path} ended while reading {entry.key!r}; the file is truncated")
            chunks.append(chunk)
        return to_f32(np.frombuffer(b"".join(chunks), dtype=numpy_storage(entry.dtype)), entry.dtype)


def nonfinite(values: Any) -> int:
    """How many NaN/inf values ``values`` (a torch tensor or numpy array, any dtype) holds."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind != "f":
            return 0
        return int(values.size - np.count_nonzero(np.isfinite(values)))
    if not values.is_floating_point():
        return 0
    import torch

    if values.element_size() == 1:  # fp8 (musubi's --fp8_base): torch has no isfinite for it;
        values = values.to(torch.float16)  # fp16 holds every fp8 value, NaN and inf included
    return int(values.numel() - torch.isfinite(values).sum())


def require_finite(values: Any, what: str, fix: str, error: type[Exception] = ModelFileError) -> None:
    """Raise ``error`` (one line: ``what`` holds N NaN/inf values; ``fix``) unless every value is finite.

    The one finite-check of ffid: delta values are checked where they are read and where they are
    written, and every position a merge or ``apply_delta`` computes before it is stored.
    """
    bad = nonfinite(values)
    if bad:
        raise error(f"{what} holds {bad:,} NaN/inf value{'s' if bad > 1 else ''}; {fix}")


def require_finite_scalar(value: float, what: str) -> float:
    """A user-given factor (``--multiplier``) as a float that fits fp32, else :class:`ConfigError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{what} {value!r} is not a number; give a finite number such as 1 or 0.5"
        ) from None
    if not math.isfinite(v) or abs(v) > float(np.finfo(np.float32).max):
        raise ConfigError(
            f"{what} {value!r} is not a finite fp32 number; give a finite number such as 1 or 0.5"
        )
    return v


def buffer_tensor(
    buf: bytearray | memoryview | np.ndarray, code: str, shape: tuple[int, ...]
) -> torch.Tensor:
    """A torch view of raw bytes (``code`` dtype, ``shape``); shares the buffer's memory."""
    import torch

    dtype = torch_dtype(code)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(memoryview(buf).cast("B"), dtype=dtype).reshape(shape)


def build_header(
    entries: Iterable[tuple[str, str, Sequence[int]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[Entry]]:
    """The header bytes (length prefix + padded JSON) for tensors stored in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ConfigError(
                f"safetensors metadata values must be strings; {bad[0]!r} is not (JSON-encode it)"
            )
        header["__metadata__"] = dict(metadata)
    laid_out = []
    offset = 0
    for key, code, shape in entries:
        if key in header:
            raise ConfigError(f"tensor key {key!r} appears twice; every stored tensor needs its own name")
        shape = tuple(int(d) for d in shape)
        n = DTYPE_BYTES[code]
        for d in shape:
            n *= d
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        laid_out.append(Entry(key, code, shape, offset, offset + n))
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # data then starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, laid_out


def alignment_order(
    entries: Sequence[tuple[str, str, Sequence[int]]],
) -> list[tuple[str, str, Sequence[int]]]:
    """Entries sorted by element size (largest first), stable: every tensor then starts aligned."""
    return sorted(entries, key=lambda e: -DTYPE_BYTES[e[1]])


def write_all(f: BinaryIO, data: Any) -> None:
    """Write a bytes-like object completely."""
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    while view:
        n = f.write(view)
        if n is None:  # pragma: no cover - only non-blocking files return None
            continue
        view = view[n:]


def copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst``'s position, in the kernel when possible."""
    dst.flush()
    fin, fout = src.fileno(), dst.fileno()
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    while done < length:
        n = min(COPY_CHUNK, length - done)
        if use_kernel:
            try:
                got = os.copy_file_range(fin, fout, n, offset + done)
            except OSError:
                use_kernel = False  # cross-device or unsupported filesystem: fall back to reads
                continue
        else:
            chunk = os.pread(fin, n, offset + done)
            got = len(chunk)
            write_all(dst, chunk)
            dst.flush()
        if got == 0:
            raise ModelFileError(f"input file ended early while copying {length} bytes at offset {offset}")
        done += got


def write_safetensors_stream(
    path: str | os.PathLike[str],
    entries: Sequence[tuple[str, str, Sequence[int]]],
    produce: Callable[[str], Any],
    metadata: dict[str, str] | None = None,
    *,
    align: bool = True,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write a safetensors file atomically, one tensor at a time; returns the file size.

    ``entries`` lists ``(key, dtype code, shape)``; ``produce(key)`` returns that tensor (a torch
    tensor, or a bytes-like object of exactly the right size) and is called once per key, in
    file order, so memory holds one tensor at a time. With ``align`` tensors are stored
    largest element size first (as safetensors itself does) so each starts aligned.
    """
    ordered = alignment_order(entries) if align else list(entries)
    head, laid_out = build_header(ordered, metadata)
    total = len(head) + (laid_out[-1].end if laid_out else 0)
    with atomic_write(path, size=total) as f:
        write_all(f, head)
        for e in laid_out:
            data = produce(e.key)
            if type(data).__module__.startswith("torch"):
                want = torch_dtypes()[e.dtype]
                if data.dtype != want or tuple(data.shape) != e.shape:
                    if data.numel() != e.numel:
                        raise ConfigError(
                            f"tensor {e.key!r} has shape {tuple(data.shape)}, the header says {e.shape}"
                        )
                    data = data.to(want)
                data = tensor_bytes(data)
            view = memoryview(data).cast("B")
            if view.nbytes != e.nbytes:
                raise ConfigError(
                    f"tensor {e.key!r} produced {view.nbytes} bytes, the header says {e.nbytes}"
                )
            write_all(f, view)
            if progress is not None:
                progress(e.nbytes)
    return total


# -- numpy helpers for the torch-free merge path --------------------------------------------------
def to_f32(arr: np.ndarray, code: str) -> np.ndarray:
    """Stored elements (``numpy_storage(code)``) as fp32 values (exact for F16/BF16/F32)."""
    if code == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def from_f32(values: np.ndarray, code: str) -> np.ndarray:
    """fp32 values cast to ``code`` storage, rounding to nearest even exactly as torch does."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if code == "BF16":
        u = values.view(np.uint32)
        bits = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)  # uint32 wraps only for NaNs
        nan = np.isnan(values)
        if nan.any():
            bits[nan] = 0x7FC0  # torch's canonical bf16 NaN
        return bits
    with np.errstate(over="ignore"):  # out-of-range values become inf, as in torch
        return values.astype(NUMPY_FLOAT[code])
