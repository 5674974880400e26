"""Activation memory: given by the user, or a rough estimate for Wan DiTs (shapes from
:mod:`ffid.presets.wan`), or left out and said so."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import ConfigError
from ..manifest import Manifest
from ..presets.wan import WanShape, wan_shape, wan_tokens

GiB = 1024**3

# Per token and per block, elements kept by one Wan block's forward for its backward, in units of
# dim and ffn (self- and cross-attention inputs/outputs, q/k/v before and after norm and rope,
# the FFN input and its two hidden tensors), for an SDPA/flash kernel that keeps no L x L matrix.
WAN_BLOCK_DIM_FACTOR = 20
WAN_BLOCK_FFN_FACTOR = 2

NOT_INCLUDED = (
    "activations (depend on resolution, frames, batch and attention kernel: pass --activations-gb, "
    "or --video_size H W --frames F for a Wan estimate)"
)


def wan_activation_bytes(
    shape: WanShape, height: int, width: int, frames: int, batch: int = 1, compute_bytes: int = 2
) -> int:
    """Activations of a Wan training step with gradient checkpointing (a rough estimate).

    Checkpointing keeps only each block's input (fp32 residual stream, 4 B) and rebuilds one block
    at a time in backward, whose saved tensors are about ``20 x dim + 2 x ffn`` elements per token.
    """
    tokens = wan_tokens(shape, height, width, frames) * batch
    kept = shape.layers * tokens * shape.dim * 4
    one_block = tokens * (WAN_BLOCK_DIM_FACTOR * shape.dim + WAN_BLOCK_FFN_FACTOR * shape.ffn) * compute_bytes
    return kept + one_block


def tokens_per_call(
    manifest: Manifest, video_size: Sequence[int] | None, frames: int | None, batch_size: int
) -> int | None:
    """Tokens per matmul call of a Wan estimate (``--video_size`` + ``--frames``), else None."""
    if video_size is None or frames is None or len(video_size) != 2:
        return None
    try:
        shape = wan_shape(manifest)
        if shape is None:
            return None
        tokens = wan_tokens(shape, int(video_size[0]), int(video_size[1]), int(frames))
        return tokens * max(1, int(batch_size))
    except (ConfigError, ValueError, TypeError):
        return None


def _wan_activations(
    manifest: Manifest,
    video_size: Sequence[int] | None,
    frames: int | None,
    batch: int,
    cbytes: int,
    notes: list[str],
) -> int:
    if video_size is None or frames is None:
        raise ConfigError("the Wan activation estimate needs both --video_size H W and --frames F")
    if len(video_size) != 2 or any(int(v) < 1 for v in video_size):
        raise ConfigError(
            f"--video_size {list(video_size)} must be two positive numbers, height and width (e.g. 480 832)"
        )
    if int(frames) < 1 or (int(frames) - 1) % 4:
        raise ConfigError(f"--frames {frames} must be 4n+1 (1, 5, ..., 81) as the Wan VAE needs")
    if int(batch) < 1:
        raise ConfigError(f"--batch_size {batch} must be a positive integer")
    shape = wan_shape(manifest)
    if shape is None:
        raise ConfigError(
            "--video_size/--frames estimate activations of Wan DiTs only and this model is not one; "
            "pass --activations-gb instead"
        )
    h, w = (int(v) for v in video_size)
    tokens = wan_tokens(shape, h, w, int(frames))
    notes.append(
        f"activations: rough Wan estimate for {h}x{w}, {frames} frames, batch {batch} "
        f"({tokens:,} tokens/video) "
        "with gradient checkpointing and a flash/SDPA kernel; not checked against measurement"
    )
    return wan_activation_bytes(shape, h, w, int(frames), int(batch), cbytes)


def activation_bytes(
    manifest: Manifest,
    activations_gb: float | None,
    video_size: Sequence[int] | None,
    frames: int | None,
    batch_size: int,
    cbytes: int,
    notes: list[str],
) -> int | None:
    """Activation bytes as given (``activations_gb``) or estimated for Wan (``video_size`` and
    ``frames``), with a note saying which; ``None`` when neither is asked (left out)."""
    if activations_gb is not None:
        if not math.isfinite(activations_gb) or activations_gb < 0:
            raise ConfigError(f"--activations-gb {activations_gb!r} must be a non-negative number of GiB")
        notes.append(f"activations: {activations_gb:g} GiB as given")
        return int(activations_gb * GiB)
    if video_size is not None or frames is not None:
        return _wan_activations(manifest, video_size, frames, batch_size, cbytes, notes)
    return None
