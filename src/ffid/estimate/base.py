"""The base weights: the dtype each is held in, and where it lives (GPU, or host with block swap).

Base dtypes are ``--base-dtype``'s names (:data:`ffid.dtypes.BASE_DTYPES`; ``fp8`` is musubi-tuner's
``--fp8_base``) plus ``fp8-scaled``, musubi's ``--fp8_base --fp8_scaled``
(``modules/fp8_optimization_utils.py``): every ``*.weight`` whose file key contains ``blocks`` and
none of Wan's excluded names (norms, embeddings, head, modulation) becomes float8_e4m3fn with a
``scale_weight`` buffer in the file's dtype; in its default "block" mode the scale has one value
per 64 input columns (``[out, in/64, 1]``), per output row (``[out, 1]``) when the input width is
not a multiple of 64, one value for tensors that are not matrices. Every other tensor keeps its
stored dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import BASE_DTYPES, DTYPE_BYTES, FLOAT_DTYPES
from ..errors import ConfigError
from ..manifest import Manifest, TensorInfo

FP8_SCALED = "fp8-scaled"
ESTIMATE_BASES = (*BASE_DTYPES, FP8_SCALED)
# musubi-tuner's wan/modules/model.py FP8_OPTIMIZATION_TARGET_KEYS / _EXCLUDE_KEYS (substrings of
# the file key) and fp8_optimization_utils' default block size.
FP8_SCALED_TARGETS = ("blocks",)
FP8_SCALED_EXCLUDE = (
    "norm",
    "patch_embedding",
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head",
    "modulation",
    "img_emb",
)
FP8_SCALED_BLOCK = 64


def check_base_dtype(name: str | None) -> str | None:
    """Validate ``--base-dtype`` (``None``: the dtypes stored in the file)."""
    if name is None:
        return None
    key = str(name).lower().replace("_", "-")
    if key not in ESTIMATE_BASES:
        raise ConfigError(
            f"--base-dtype {name!r} is not supported; choose one of: {', '.join(ESTIMATE_BASES)}"
        )
    return key


def fp8_scaled_target(info: TensorInfo) -> bool:
    """Whether musubi's ``--fp8_scaled`` quantizes this tensor (its ``is_target_key`` on the file key)."""
    key = info.source_name
    return (
        info.dtype in FLOAT_DTYPES
        and key.endswith(".weight")
        and any(t in key for t in FP8_SCALED_TARGETS)
        and not any(x in key for x in FP8_SCALED_EXCLUDE)
    )


def fp8_scale_numel(shape: tuple[int, ...], block: int = FP8_SCALED_BLOCK) -> int:
    """Elements of the ``scale_weight`` musubi keeps for a quantized weight of ``shape``."""
    if len(shape) != 2:
        return 1  # per-tensor fallback
    rows, cols = shape
    return rows * (cols // block) if cols % block == 0 else rows


def check_fp8_scaled(manifest: Manifest) -> None:
    """musubi refuses ``--fp8_scaled`` on a file whose target weights are already 1-byte floats."""
    for t in manifest:
        if fp8_scaled_target(t) and DTYPE_BYTES[t.dtype] == 1:
            raise ConfigError(
                f"--fp8_scaled needs a bf16/fp16/fp32 file, but {t.source_name} is already {t.dtype} "
                "(musubi-tuner refuses it too); use the bf16 file, or --base-dtype fp8 for this one"
            )


def stored_dtype(info: TensorInfo, base_dtype: str | None) -> str:
    """The dtype a base tensor has in memory. ``fp8`` is musubi-tuner's ``--fp8_base`` without
    ``--fp8_scaled``: it casts the whole DiT with ``model.to(float8_e4m3fn)``, so every float
    tensor, vectors included, holds 1 byte per element. ``fp8-scaled`` quantizes only the block
    Linear weights (their scales are counted by :func:`scale_bytes`)."""
    if base_dtype is None or info.dtype not in FLOAT_DTYPES:
        return info.dtype  # integer buffers keep their dtype
    if base_dtype == FP8_SCALED:
        return "F8_E4M3" if fp8_scaled_target(info) else info.dtype
    return BASE_DTYPES[base_dtype]


def scale_bytes(info: TensorInfo, base_dtype: str | None) -> int:
    """Bytes of the fp8 scale musubi adds for this tensor (in the file's dtype), else 0."""
    if base_dtype != FP8_SCALED or not fp8_scaled_target(info):
        return 0
    return fp8_scale_numel(info.shape) * DTYPE_BYTES[info.dtype]


def compute_dtype_of(manifest: Manifest, base_dtype: str | None) -> str:
    """The dtype the Linear path computes in: bf16 for fp8 bases (the scales' dtype, the file's,
    for fp8-scaled), else the dominant base dtype."""
    if base_dtype == "fp8":
        return "BF16"
    if base_dtype is not None and base_dtype != FP8_SCALED:
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

    @property
    def model(self) -> int:
        """The whole model in its base dtype (resident + parked; in-flight is a copy of parked)."""
        return self.resident + self.parked


def place_base(manifest: Manifest, base_dtype: str | None, blocks_to_swap: int) -> BasePlacement:
    """Where the base weights live with ``blocks_to_swap`` blocks swapped, in ``base_dtype``.

    fp8-scaled scales stay on the GPU for swapped blocks too: musubi's offloader moves only the
    Linear ``weight`` tensors (``weighs_to_device``); buffers such as ``scale_weight`` stay.
    """
    nblocks, parked = swapped_blocks(manifest, blocks_to_swap)

    def nbytes(t: TensorInfo) -> int:
        return t.numel * DTYPE_BYTES[stored_dtype(t, base_dtype)]

    resident = sum(nbytes(t) for t in manifest if t.name not in parked)
    resident += sum(scale_bytes(t, base_dtype) for t in manifest)
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
