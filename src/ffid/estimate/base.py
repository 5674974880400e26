"""The base weights: the dtype each is held in, and where it lives (GPU, or host with block swap)."""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import BASE_DTYPES, DTYPE_BYTES, FLOAT_DTYPES
from ..errors import ConfigError
from ..manifest import Manifest, TensorInfo


def check_base_dtype(name: str | None) -> str | None:
    """Validate ``--base-dtype`` (``None``: the dtypes stored in the file)."""
    if name is None:
        return None
    key = str(name).lower()
    if key not in BASE_DTYPES:
        raise ConfigError(f"--base-dtype {name!r} is not supported; choose one of: {', '.join(BASE_DTYPES)}")
    return key


def stored_dtype(info: TensorInfo, base_dtype: str | None) -> str:
    """The dtype a base tensor has in memory. ``fp8`` is musubi-tuner's ``--fp8_base`` (without
    ``--fp8_scaled``, which ffid refuses): it casts the whole DiT with ``model.to(float8_e4m3fn)``,
    so every float tensor, vectors included, holds 1 byte per element."""
    if base_dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype  # integer buffers keep their dtype
    return BASE_DTYPES[base_dtype]


def compute_dtype_of(manifest: Manifest, base_dtype: str | None) -> str:
    """The dtype the Linear path computes in: bf16 for fp8 bases, else the dominant base dtype."""
    if base_dtype == "fp8":
        return "BF16"
    if base_dtype is not None:
        return BASE_DTYPES[base_dtype]
    by_dtype: dict[str, int] = {}
    for t in manifest:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel
    dominant = max(by_dtype, key=by_dtype.__getitem__)
    return "BF16" if dominant.startswith("F8") else dominant


def swapped_blocks(manifest: Manifest, blocks_to_swap: int) -> tuple[int, set[str]]:
    """``(number of blocks, names of the tensors in the last blocks_to_swap blocks)``.

    Block swap parks the *last* N blocks of the largest block group (musubi-tuner's convention).
    """
    groups: dict[str, set[int]] = {}
    for b in manifest.blocks():
        groups.setdefault(b.group, set()).add(b.index)
    if not groups:
        if blocks_to_swap:
            raise ConfigError(
                f"--blocks_to_swap {blocks_to_swap}: the model has no repeated blocks to swap; use 0 "
                "(or --block-pattern to say where its blocks are)"
            )
        return 0, set()
    group = max(groups, key=lambda g: len(groups[g]))
    indices = sorted(groups[group])
    n = len(indices)
    if not 0 <= blocks_to_swap < n:
        raise ConfigError(
            f"--blocks_to_swap {blocks_to_swap} is out of range for a model with {n} blocks; use 0..{n - 1} "
            "(at least one block must stay on the GPU)"
        )
    parked = set(indices[n - blocks_to_swap :]) if blocks_to_swap else set()
    names = set()
    for t in manifest:
        b = manifest.block_of(t.name)
        if b is not None and b.group == group and b.index in parked:
            names.add(t.name)
    return n, names


@dataclass(frozen=True)
class BasePlacement:
    """Bytes of the base weights by place. All sizes are bytes."""

    blocks: int  # blocks of the largest block group (0 when the model has none)
    resident: int  # on the GPU for the whole run
    in_flight: int  # swapped blocks on the GPU while they compute / are copied in
    parked: int  # swapped blocks waiting in pinned host RAM


def place_base(manifest: Manifest, base_dtype: str | None, blocks_to_swap: int) -> BasePlacement:
    """Where the base weights live with ``blocks_to_swap`` blocks swapped, in ``base_dtype``."""
    nblocks, parked = swapped_blocks(manifest, blocks_to_swap)

    def nbytes(t: TensorInfo) -> int:
        return t.numel * DTYPE_BYTES[stored_dtype(t, base_dtype)]

    resident = sum(nbytes(t) for t in manifest if t.name not in parked)
    parked_bytes = sum(nbytes(t) for t in manifest if t.name in parked)
    in_flight = 0
    if parked:
        per_block: dict[int, int] = {}
        for t in manifest:
            if t.name in parked:
                b = manifest.block_of(t.name)
                assert b is not None
                per_block[b.index] = per_block.get(b.index, 0) + nbytes(t)
        # One swapped block is computing while the next one is copied in.
        in_flight = 2 * max(per_block.values()) if len(per_block) > 1 else max(per_block.values())
    return BasePlacement(nblocks, resident, in_flight, parked_bytes)
