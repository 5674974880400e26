"""One run's estimate as a record (:class:`Estimate`), and what such a run is usually for."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ff thresholds (upper bounds) -> what such a run is typically for (after the seed's table).
USE_CASES: tuple[tuple[float, str], ...] = (
    (0.0005, "a light touch: a style nudge or one simple subject"),
    (0.005, "baseline for a simple character"),
    (0.03, "several characters and/or concepts"),
    (0.075, "deeper style transfer, complex concepts or characters"),
    (0.5, "very heavy finetuning on a specific domain"),
    (1.0, "full finetuning (no saving over training every weight)"),
)


# What a fit (``--gpu-gb``) keeps free for the CUDA context and the allocator's fragmentation,
# which the estimate itself leaves out (the GPU bench counts the same; docs/gpu.md).
CONTEXT_BYTES = 1024**3


@dataclass(frozen=True)
class Fit:
    """The fewest swapped blocks for which a run fits a card (``--gpu-gb``). Sizes are bytes."""

    budget_bytes: int  # the card's memory
    blocks_to_swap: int  # the fewest that fit, or the most there are when none does
    gpu_bytes: int  # the estimate's GPU total with that many swapped (context not included)
    host_bytes: int  # the host RAM peak with that many swapped
    fits: bool  # gpu_bytes + CONTEXT_BYTES <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "context_bytes": CONTEXT_BYTES,
            "blocks_to_swap": self.blocks_to_swap,
            "gpu_bytes": self.gpu_bytes,
            "host_bytes": self.host_bytes,
            "fits": self.fits,
        }


def use_case(ff: float) -> str:
    """A one-line hint of what a run with this ``ff`` is usually for."""
    for bound, text in USE_CASES:
        if ff <= bound:
            return text
    return USE_CASES[-1][1]


@dataclass
class Estimate:
    """Memory needs of one run (one ``ff``), broken down by part. All sizes are bytes."""

    ff: float
    selector: str
    ffid: int
    selector_options: dict[str, int]  # every option of the selector, defaults included
    trainable: int
    total_params: int
    tensors_touched: int
    tensors_total: int
    optimizer: str
    base_dtype: str
    compute_dtype: str
    blocks: int
    blocks_to_swap: int
    gpu: dict[str, int]
    host: dict[str, int]
    delta_file_bytes: int
    hint: str
    not_included: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    experts: int = 1  # 2: both Wan 2.2 A14B experts in one run (delta_file_bytes covers both deltas)
    fit: Fit | None = None  # with --gpu-gb: the fewest blocks_to_swap that fit the card

    @property
    def fraction(self) -> float:
        return self.trainable / self.total_params

    @property
    def gpu_total(self) -> int:
        """Everything on the compute device that this estimate includes."""
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        """Peak host RAM: the larger of loading (whole state dict) and training (swapped + copies)."""
        steady = sum(v for k, v in self.host.items() if k != "load_peak")
        return max(self.host.get("load_peak", 0), steady)

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (sizes in bytes)."""
        return {
            "ff": self.ff,
            "selector": self.selector,
            "ffid": self.ffid,
            "selector_options": dict(self.selector_options),
            "trainable": self.trainable,
            "total_params": self.total_params,
            "fraction": self.fraction,
            "tensors_touched": self.tensors_touched,
            "tensors_total": self.tensors_total,
            "optimizer": self.optimizer,
            "base_dtype": self.base_dtype,
            "compute_dtype": self.compute_dtype,
            "blocks": self.blocks,
            "blocks_to_swap": self.blocks_to_swap,
            "gpu_bytes": self.gpu_total,
            "gpu": dict(self.gpu),
            "host_bytes": self.host_total,
            "host": dict(self.host),
            "delta_file_bytes": self.delta_file_bytes,
            "use_case": self.hint,
            "not_included": list(self.not_included),
            "notes": list(self.notes),
            "experts": self.experts,
            "fit": None if self.fit is None else self.fit.to_dict(),
        }
