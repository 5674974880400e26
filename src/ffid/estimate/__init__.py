"""Memory needs of a run, from the model's manifest alone (a header or a preset), before training.

The figures follow what the engine really allocates (see :data:`ENGINE`), element for element:
the selection is planned exactly (the same ``plan()`` training uses), so the trainable count is
``k`` itself, not a tensor-level approximation. What cannot be known from a header (activations:
they depend on resolution, frames, batch and the attention kernel) is left out unless the user
gives it (``activations_gb``) or asks for the Wan estimate (``video_size`` + ``frames``), and the
result says so.

Parts and where they live::

    GPU   base_resident   base weights kept on the device (all of them without block swap)
          swap_in_flight  swapped blocks being used on the device (block swap only)
          proxies         fp32 trained values, k x 4 B
          indices         int32 flat positions (4 B/elem) of every partially touched tensor on
                          the compute device, plus CSR row pointers for matmul-path weights
          gradients       fp32 gradients of the proxies only, k x 4 B
          optimizer       optimizer state of the proxies (AdamW 8 B/elem, ...)
          workspace       the largest transient temporary (an upcast weight copy when the base
                          dtype is not the compute dtype, musubi's two dequantized copies of an
                          fp8-scaled weight, a whole tensor's dense gradient, a proxy gradient)
                          plus the effective copies of hook-path tensors kept for backward
          dequant_kept    fp8-scaled only: the untrained dequantized weights of the block being
                          rebuilt, kept by autograd for its backward
          inactive_expert two experts only: the other expert's weights on the GPU
          grad_path       the proxy-gradient path's own transient, an upper bound (the dense
                          product of a weight, a block of it, or a token chunk of converted
                          operands; --grad_path, default auto: the largest the engine may pick;
                          the chunk is exact when --video_size/--frames give the tokens)
          activations     only when given or estimated
    host  swapped_blocks  weights of the swapped blocks, parked in pinned RAM
          inactive_expert two experts only: the other expert's weights in RAM (its swapped
                          blocks, or all of it with --offload_inactive_dit)
          expert_switch   --offload_inactive_dit: the active expert, moved to RAM at each switch
          load_peak       the whole state dict while loading (what musubi-tuner does)

Nothing here imports torch: ``ffid estimate`` on a 14B header answers in a fraction of a second.

Modules, one job each::

    optimizer    optimizer state per optimizer type (shared with the trainer's start-up summary)
    base         base dtypes (fp8-scaled too) and where the base weights live (block swap)
    experts      where the inactive expert of a two-expert Wan 2.2 run lives
    engine       what ffid.engine allocates: indices, workspace, the gradient path's transient
    activations  given, rough Wan estimate (shapes from ffid.presets.wan), or left out
    disk         the delta file size, from ffid.checkpoint's writer
    result       the Estimate record and use-case hints
    compose      plan the selection and add up the parts: estimate(), estimate_selection()
    tables       text output
"""

from __future__ import annotations

from ..presets.wan import WanShape, wan_shape, wan_tokens
from .activations import WAN_BLOCK_DIM_FACTOR, WAN_BLOCK_FFN_FACTOR, GiB, wan_activation_bytes
from .base import (
    BASE_DTYPES,
    ESTIMATE_BASES,
    FP8_SCALED,
    check_base_dtype,
    compute_dtype_of,
    fp8_scale_numel,
    fp8_scaled_target,
    stored_dtype,
    swapped_blocks,
)
from .compose import estimate, estimate_selection, fit_blocks_to_swap
from .disk import delta_file_bytes, index_dtype_bytes
from .engine import ENGINE, ENGINE_NOTE, GRAD_PATHS, EngineLayout, engine_routes
from .optimizer import OPTIMIZERS, OptimizerModel, check_optimizer, optimizer_state_bytes
from .result import CONTEXT_BYTES, USE_CASES, Estimate, Fit, use_case
from .tables import GPU_LABELS, HOST_LABELS, format_estimates, human_bytes, human_count

__all__ = [
    "BASE_DTYPES",
    "CONTEXT_BYTES",
    "ENGINE",
    "ENGINE_NOTE",
    "ESTIMATE_BASES",
    "FP8_SCALED",
    "GPU_LABELS",
    "GRAD_PATHS",
    "HOST_LABELS",
    "OPTIMIZERS",
    "USE_CASES",
    "WAN_BLOCK_DIM_FACTOR",
    "WAN_BLOCK_FFN_FACTOR",
    "EngineLayout",
    "Estimate",
    "Fit",
    "GiB",
    "OptimizerModel",
    "WanShape",
    "check_base_dtype",
    "check_optimizer",
    "compute_dtype_of",
    "delta_file_bytes",
    "engine_routes",
    "estimate",
    "estimate_selection",
    "fit_blocks_to_swap",
    "format_estimates",
    "fp8_scale_numel",
    "fp8_scaled_target",
    "human_bytes",
    "human_count",
    "index_dtype_bytes",
    "optimizer_state_bytes",
    "stored_dtype",
    "swapped_blocks",
    "use_case",
    "wan_activation_bytes",
    "wan_shape",
    "wan_tokens",
]
