"""A resumable data order: which items make micro-batch ``i`` of epoch ``e``, from the seed alone.

A ``DataLoader`` keeps its position in an iterator that cannot be saved. Here the order of an
epoch is a permutation drawn from ``(seed, epoch)``, so resuming at (epoch, index) needs two
integers and repeats the uninterrupted run exactly, on any number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

# Mixes the epoch into the seed so that epochs of nearby seeds do not share permutations.
_EPOCH_MIX = 1_000_003


@dataclass(frozen=True)
class BatchOrder:
    """Micro-batch ``index`` of ``epoch`` for process ``rank`` of ``world``.

    Each global micro-batch holds ``batch_size * world`` entries of the epoch's permutation;
    process ``rank`` takes its ``batch_size`` slice. The last global batch of an epoch may be
    short; a process whose slice is empty wraps to the start of the permutation.

    With ``groups`` (a bucket id per item, e.g. one per latent resolution) a batch never mixes
    buckets: each bucket is permuted and cut into global batches on its own, and the order of
    all those batches is then shuffled, from the same ``(seed, epoch)`` draw.
    """

    items: int
    batch_size: int
    seed: int
    rank: int = 0
    world: int = 1
    groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.groups is not None and len(self.groups) != self.items:
            raise ValueError(f"{len(self.groups)} bucket ids for {self.items} items")

    @cached_property
    def _members(self) -> list[torch.Tensor]:
        """Item ids of each bucket, buckets in id order (one bucket of all items without groups)."""
        if self.groups is None:
            return [torch.arange(self.items)]
        ids = torch.tensor(self.groups)
        return [torch.nonzero(ids == g).flatten() for g in sorted(set(self.groups))]

    @property
    def _global(self) -> int:
        return self.batch_size * self.world

    @property
    def batches_per_epoch(self) -> int:
        return max(1, sum(math.ceil(len(m) / self._global) for m in self._members))

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * _EPOCH_MIX + epoch)
        return torch.randperm(self.items, generator=g)

    def plan(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's global batches in order, each with its bucket's permutation (for wrapping)."""
        if self.groups is None:
            perm = self.permutation(epoch)
            return [(perm[s : s + self._global], perm) for s in range(0, self.items, self._global)] or [
                (perm, perm)
            ]
        g = torch.Generator().manual_seed(self.seed * _EPOCH_MIX + epoch)
        batches = []
        for members in self._members:
            perm = members[torch.randperm(len(members), generator=g)]
            batches += [(perm[s : s + self._global], perm) for s in range(0, len(perm), self._global)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def _slice(self, batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
        chunk, perm = batch
        chosen = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if len(chosen) == 0:
            chosen = perm[: self.batch_size]
        return chosen.tolist()

    def batch(self, epoch: int, index: int) -> list[int]:
        """Item ids of micro-batch ``index`` of ``epoch`` for this process."""
        return self._slice(self.plan(epoch)[index])

    def iterate(self, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
        """Yield ``(epoch, index, item_ids)`` from the given position on, forever."""
        while True:
            plan = self.plan(epoch)
            while index < len(plan):
                yield epoch, index, self._slice(plan[index])
                index += 1
            epoch, index = epoch + 1, 0


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to ``device`` (other values pass through)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


__all__ = ["BatchOrder", "move_to"]
