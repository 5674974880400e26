"""Memory of protection by projection's bases, from a selection alone (no model loaded).

Each trained matrix gets a basis of the inputs its layer reads for the protected prompts: a
``width x r`` fp32 matrix, stored as its complement when ``r > width / 2`` (see
:mod:`ffid.preserve.projection`), so never more than ``width x width / 2``. Layers that read the
very same tensor (Wan's self-attention q/k/v; every block's cross-attention K/V) share one basis
at run time; the figures here count one per trained matrix, so they are upper bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..presets.wan import TEXT_SIDE_PATTERN, WanShape
from ..selection import Selection

# The protected rank as a share of the width. The bound takes the worst case (half the width,
# the largest basis the complement storage keeps); ``typical`` the share given by the caller.
WORST_SHARE = 0.5


@dataclass(frozen=True)
class ProjectionMemory:
    """Bytes of the bases of a whole-row selection."""

    matrices: int
    bound_bytes: int  # width x width/2 x 4 B per trained matrix
    share: float  # the protected rank share ``typical_bytes`` assumes
    typical_bytes: int
    largest_bytes: int = 0  # the largest single basis (bound): what preserve_bases=cpu holds on the GPU

    def line(self) -> str:
        gib = 2**30
        return (
            "Projection bases (preserve_method = 'projection'): at most "
            f"{self.bound_bytes / gib:.2f} GiB fp32 over {self.matrices} matrices; "
            f"{self.typical_bytes / gib:.2f} GiB at a protected rank of "
            f"{self.share:.0%} of the width (layers reading one input share a basis: less); with "
            f"preserve_bases=cpu they stay in host memory and the GPU holds one at a time (at most "
            f"{self.largest_bytes / 2**20:.0f} MiB), moved twice a step"
        )


def projection_memory(sel: Selection, share: float = 0.2) -> ProjectionMemory:
    """The bases' memory for ``sel`` (whole rows of matrices) at a protected rank ``share``."""
    widths = [p.shape[1] for p in sel.values() if len(p.shape) == 2]
    part = min(share, 1 - share)
    return ProjectionMemory(
        matrices=len(widths),
        bound_bytes=sum(w * (w // 2) * 4 for w in widths),
        share=share,
        typical_bytes=sum(w * int(w * part) * 4 for w in widths),
        largest_bytes=max((w * (w // 2) * 4 for w in widths), default=0),
    )


# Spec-sheet dense throughputs (TFLOP/s) of two reference cards (bf16 tensor cores, fp32 without
# TF32, fp64), and the share of them a DiT forward and a large product reach in practice.
# Estimates, not measurements: the feature pass has not been timed on a GPU yet (docs/gpu.md).
CARDS = {"H100 SXM": (989.0, 67.0, 67.0), "RTX 4090": (165.0, 82.6, 1.3)}  # (bf16, fp32, fp64)
EFFICIENCY = 0.4
TEXT_TOKENS = 512  # Wan's padded text length
# Token rows of one protected input that an image-side layer folds into its Gram matrix (the
# feature pass's default ``preserve_tokens``; 0 means all). A Wan 14B video at 480x832, 81 frames
# is 32,760 tokens: a uniform sample of 4,096 (scaled back to the input's size, so the Gram stays
# an unbiased estimate) cuts the image side's products 8x, and 16 protected inputs still give
# 65,536 rows for a 5,120-wide layer. The text side reads <= 512 tokens and is never sampled (its
# protection is exact); the demo's 64-token images are taken whole.
TOKEN_BUDGET = 4096


@dataclass(frozen=True)
class FeaturePassCost:
    """Work of the projection method's feature pass for a Wan DiT (see ffid.preserve.projection)."""

    tokens: int  # per video
    forwards: int  # DiT forwards: drawings' sampler steps + the re-noised inputs
    forward_flops: float  # one forward
    gram_flops: float  # the Gram products of one protected input, all trained layers
    gram_bytes: int  # Gram matrices held while collecting: one per input group (see input_group)
    inputs: int  # protected inputs folded into the Grams
    exact_flops: float = 0.0  # the text side's share of gram_flops (float64 on every device)
    budget: int = 0  # image-side token rows per input in a Gram (0: all)

    def seconds(self, bf16_tflops: float, fp32_tflops: float, fp64_tflops: float) -> float:
        """On a GPU: the video side's Gram products in float32, the text side's in float64."""
        rate = EFFICIENCY * 1e12
        sampled = self.gram_flops - self.exact_flops
        return (
            self.forwards * self.forward_flops / (bf16_tflops * rate)
            + self.inputs * sampled / (fp32_tflops * rate)
            + self.inputs * self.exact_flops / (fp64_tflops * rate)
        )

    def line(self) -> str:
        times = ", ".join(f"{name} ~{self.seconds(*r) / 60:.0f} min" for name, r in CARDS.items())
        sampled = f", {self.budget:,} of them sampled into each Gram" if 0 < self.budget < self.tokens else ""
        return (
            f"Feature pass ({self.tokens:,} tokens/video{sampled}): {self.forwards} DiT forwards "
            f"({self.forward_flops / 1e15:.2f} PFLOP each) + Grams of {self.inputs} inputs "
            f"({self.gram_flops / 1e15:.2f} PFLOP each: video side float32 on a GPU, text side "
            f"{self.exact_flops / 1e9:.0f} GFLOP float64), Grams {self.gram_bytes / 2**30:.1f} GiB in "
            "CPU memory while collecting (one per input read, image side float32); at "
            f"{EFFICIENCY:.0%} of spec throughput: {times} (estimate, not timed); its forwards cost "
            f"about as much as {self.forwards / 3:.0f} training steps (forward + backward)"
        )


def input_group(name: str) -> str:
    """Which input a Wan DiT Linear reads, as the feature pass groups them: a block's
    self-attention q/k/v read one tensor, and every block's cross-attention K/V read the same text
    features (the text embedding runs once per forward); every other Linear reads its own."""
    m = re.match(r"(.*?)(self_attn|attn1)\.(q|k|v|to_q|to_k|to_v)\.weight$", name)
    if m:
        return f"{m.group(1)}self_attn.qkv"
    if re.search(r"(cross_attn\.(k|v)|attn2\.(to_k|to_v))\.weight$", name):
        return "cross_attn.kv (every block)"
    return name


def feature_pass_cost(
    sel: Selection,
    shape: WanShape,
    tokens: int,
    prompts: int,
    draws: int = 4,
    times: int = 2,
    sample_steps: int = 10,
    budget: int = TOKEN_BUDGET,
) -> FeaturePassCost:
    """The feature pass of ``prompts`` protected prompts for a Wan DiT of ``shape`` at ``tokens``
    per video, training ``sel`` (whole rows), with ``budget`` image-side tokens of each input in
    a Gram (0: all)."""
    d, f, n = shape.dim, shape.ffn, shape.layers
    per_block = 2 * tokens * (6 * d * d + 2 * d * f) + 4 * tokens * tokens * d + 4 * tokens * TEXT_TOKENS * d
    gram = 0.0
    exact = 0.0
    held = 0
    groups: set[str] = set()
    for name, pick in sel.items():
        if len(pick.shape) != 2:
            continue
        width = pick.shape[1]
        text = bool(re.search(TEXT_SIDE_PATTERN, name))
        if text:
            rows_read = TEXT_TOKENS  # the text side reads the encodings, not the video
        elif "time_" in name:
            rows_read = 1
        else:
            rows_read = min(tokens, budget) if budget else tokens
        group = input_group(name)
        if group in groups:
            continue  # one Gram per input read: the group's first layer folds it in
        groups.add(group)
        gram += 2 * rows_read * width * width
        exact += 2 * rows_read * width * width if text else 0
        # on a GPU the image side's Grams are summed in float32, the text side's in float64
        held += width * width * (8 if text else 4)
    inputs = prompts * draws * times
    return FeaturePassCost(
        tokens=tokens,
        forwards=prompts * draws * (sample_steps + times),
        forward_flops=per_block * n,
        gram_flops=gram,
        gram_bytes=held,
        inputs=inputs,
        exact_flops=exact,
        budget=budget,
    )
