"""Memory of protection by projection's bases, from a selection alone (no model loaded).

Each trained matrix gets a basis of the inputs its layer reads for the protected prompts: a
``width x r`` fp32 matrix, stored as its complement when ``r > width / 2`` (see
:mod:`ffid.preserve.projection`), so never more than ``width x width / 2``. Layers that read the
very same tensor (Wan's self-attention q/k/v; every block's cross-attention K/V) share one basis
at run time; the figures here count one per trained matrix, so they are upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def line(self) -> str:
        gib = 2**30
        return (
            "Projection bases (preserve_method = 'projection'): at most "
            f"{self.bound_bytes / gib:.2f} GiB fp32 over {self.matrices} matrices; "
            f"{self.typical_bytes / gib:.2f} GiB at a protected rank of "
            f"{self.share:.0%} of the width (layers reading one input share a basis: less)"
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
    )
