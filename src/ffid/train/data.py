"""A resumable data order: which items make micro-batch ``i`` of epoch ``e``, from the seed alone.

A ``DataLoader`` keeps its position in an iterator that cannot be saved. Here the order of an
epoch is a permutation drawn from ``(seed, epoch)``, so resuming at (epoch, index) needs two
integers and repeats the uninterrupted run exactly, on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# Mixes the epoch into the seed so that epochs of nearby seeds do not share permutations.
_EPOCH_MIX = 1_000_003


@dataclass(frozen=True)
class BatchOrder:
    """Micro-batch ``index`` of ``epoch`` for process ``rank`` of ``world``.

    Each global micro-batch holds ``batch_size * world`` consecutive entries of the epoch's
    permutation; process ``rank`` takes its ``batch_size`` slice. The last global batch of an
    epoch may be short; a process whose slice is empty wraps to the start of the permutation.
    """

    items: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1

    @property
    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(self.items / (self.batch_size * self.world)))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * _EPOCH_MIX + epoch)
        return torch.randperm(self.items, generator=g)

    def batch(self, epoch: int, index: int, perm: torch.Tensor | None = None) -> list[int]:
        perm = self.permutation(epoch) if perm is None else perm
        start = (index * self.world + self.rank) * self.batch_size
        chosen = perm[start : start + self.batch_size]
        if len(chosen) == 0:
            chosen = perm[: self.batch_size]
        return chosen.tolist()

    def iterate(self, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield ``(epoch, index, item_ids)`` from the given position on, forever."""
        while True:
            perm = self.permutation(epoch)
            while index < self.batches_per_epoch:
                yield epoch, index, self.batch(epoch, index, perm)
                index += 1
            epoch, index = epoch + 1, 0


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (other values pass through)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


__all__ = ["BatchOrder", "move_to"]
