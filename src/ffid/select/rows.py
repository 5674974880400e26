"""The ``rows`` selector: whole rows of the model's matrices, disjoint across ids.

Made for protection by projection (:mod:`ffid.preserve.projection`). A Linear layer ``y = W x``
answers an input ``x`` through every entry of a row at once, so a change can be kept off the
protected inputs only row by row: ``dW_row <- dW_row (I - Q Q^T)`` turns a sparse change into a
dense one. This selector therefore trains whole rows:

1. **Matrices only.** Only 2-D tensors are candidates (Linear weights; embeddings are 2-D too, and
   the projection refuses what it cannot protect). Norms, biases, modulation tables and
   convolutions are never picked.
2. **Slots.** Each matrix's ``R`` rows are put in a fixed order (a per-tensor rotation from a hash
   of the name, then a golden-ratio step coprime to ``R``: integer arithmetic, the same on every
   machine). The order is cut into ``slots`` blocks of ``floor``/``ceil(R / slots)`` rows; ``--ffid
   j`` owns block ``j``. Different ids never share a row.
3. **Budget.** ``--ff`` keeps its meaning, a share of *all* the model's parameters: rows are
   apportioned to matrices in proportion to their row counts (the ``spread`` selector's seat order,
   every matrix covered first), and the smallest number of rows whose elements reach
   ``round(ff * N)`` is taken. So a run trains at most one row's elements more than asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CapacityError, ConfigError
from ..manifest import Manifest
from ..selection import Selection, TensorPick
from .spread import (
    _GOLDEN,
    DEFAULT_SLOTS,
    SlottedSelector,
    _check_id,
    _coprime_multiplier,
    _floor_digits,
    apportion,
    target_count,
)

if TYPE_CHECKING:
    import numpy as np



@dataclass(frozen=True)
class RowSlot:
    """The row order of one matrix and the block of rows one id owns in it."""

    rows: int
    cols: int
    offset: int
    mult: int
    lo: int
    capacity: int  # rows in this id's block

    @classmethod
    def build(cls, name: str, shape: tuple[int, ...], ffid: int, slots: int, seed: int) -> RowSlot:
        rows, cols = int(shape[0]), int(shape[1])
        digest = hashlib.blake2b(f"ffid-rows:{seed}:{name}".encode(), digest_size=8).digest()
        lo, hi = ffid * rows // slots, (ffid + 1) * rows // slots
        return cls(
            rows=rows,
            cols=cols,
            offset=int.from_bytes(digest, "little") % rows,
            mult=_coprime_multiplier(rows, _GOLDEN) if rows > 1 else 0,
            lo=lo,
            capacity=hi - lo,
        )

    def row_ids(self, nrows: int):  # type: ignore[no-untyped-def]
        """The sorted row numbers of this id's first ``nrows`` rows (int64 tensor)."""
        import torch

        if torch.compiler.is_compiling():
            # Inside a torch.compile region dynamo traces torch ops, not numpy: the same map in torch.
            if nrows > self.capacity:
                raise CapacityError(f"asked for {nrows} rows from a slot holding {self.capacity}")
            ranks = torch.arange(self.lo, self.lo + nrows, dtype=torch.int64)
            rows = ranks.add_(self.offset).remainder_(self.rows).mul_(self.mult).remainder_(self.rows)
            return rows.sort().values if self.rows > 1 else rows.zero_()
        return torch.from_numpy(self._row_ids_np(nrows))

    def _row_ids_np(self, nrows: int) -> np.ndarray:
        # numpy, not torch: an implicit-index delta is rebuilt by `ffid merge`, which needs no torch.
        import numpy as np
        if nrows > self.capacity:
            raise CapacityError(f"asked for {nrows} rows from a slot holding {self.capacity}")
        if self.rows <= 1:
            return np.zeros(nrows, dtype=np.int64)
        rows = np.arange(self.lo, self.lo + nrows, dtype=np.int64)
        rows += self.offset
        rows %= self.rows
        rows *= self.mult
        rows %= self.rows
        rows.sort()
        return rows

    def indices(self, count: int):  # type: ignore[no-untyped-def]
        """:meth:`indices_np` as a torch tensor (sharing its memory)."""
        import torch

        if torch.compiler.is_compiling():  # see row_ids: torch ops only while dynamo traces
            if count % self.cols:
                raise CapacityError(f"{count} elements are not whole rows of {self.cols}")
            rows = self.row_ids(count // self.cols)
            return (rows[:, None] * self.cols + torch.arange(self.cols, dtype=torch.int64)).reshape(-1)
        return torch.from_numpy(self.indices_np(count))

    def indices_np(self, count: int) -> np.ndarray:
        """Sorted flat indices: whole rows, each ``cols`` consecutive positions."""
        import numpy as np
        if count % self.cols:
            raise CapacityError(f"{count} elements are not whole rows of {self.cols}")
        rows = self._row_ids_np(count // self.cols)
        return (rows[:, None] * self.cols + np.arange(self.cols, dtype=np.int64)).reshape(-1)

    def key(self) -> str:
        return f"rows:{self.offset}:{self.lo}"

    def overlap(self, count: int, other: object, other_count: int) -> int | None:
        if not isinstance(other, RowSlot) or (self.rows, self.cols, self.offset) != (
            other.rows,
            other.cols,
            other.offset,
        ):
            return None
        a, b = count // self.cols, other_count // other.cols
        return self.cols * max(0, min(self.lo + a, other.lo + b) - max(self.lo, other.lo))


def matrix_names(manifest: Manifest, names: list[str]) -> list[str]:
    """The candidates among ``names``: 2-D tensors with at least one row and column."""
    return [n for n in names if len(manifest[n].shape) == 2 and min(manifest[n].shape) > 0]


def select_rows(
    manifest: Manifest, *, ff: float, ffid: int, names: list[str], slots: int = DEFAULT_SLOTS, seed: int = 0
) -> Selection:
    """Plan a ``rows`` selection over the matrices among ``names`` for ``ff`` / ``ffid``."""
    _check_id(ffid, slots)
    total = manifest.total_params
    k = target_count(ff, total)
    if k < 1:
        raise ConfigError(
            f"--ff {ff} selects no element of a model with {total:,} parameters; use --ff >= {1 / total:.3g}"
        )
    mats = matrix_names(manifest, names)
    if not mats:
        raise ConfigError(
            "the rows selector trains rows of 2-D weights, and none of the chosen tensors is one; widen "
            "--include (e.g. '^blocks\\.') or use the spread selector"
        )
    layouts = [RowSlot.build(n, manifest[n].shape, ffid, slots, seed) for n in mats]
    caps = [s.capacity for s in layouts]
    capacity = sum(c * s.cols for c, s in zip(caps, layouts, strict=True))
    if capacity == 0:
        rows = max(s.rows for s in layouts)
        raise CapacityError(
            f"id {ffid} of the {slots}-slot rows layout holds no row here: the matrices have at most "
            f"{rows} rows, fewer than the slots; use at most --slots {rows}"
        )
    if k > capacity:
        raise CapacityError(
            f"--ff {ff} asks for {k:,} elements but id {ffid} of the {slots}-slot rows layout holds "
            f"{capacity:,} here ({capacity / total:.4%} of the model); lower --ff to at most "
            f"{_floor_digits(capacity / total)}, or use fewer slots (--slots {max(1, slots // 2)}; "
            "selections of different layouts are not disjoint)"
        )
    sizes = [s.rows for s in layouts]

    def elements(nrows: int) -> int:
        return sum(c * s.cols for c, s in zip(apportion(sizes, caps, nrows), layouts, strict=True))

    lo, hi = 1, sum(caps)  # smallest row count whose elements reach k (elements grow with rows)
    while lo < hi:
        mid = (lo + hi) // 2
        if elements(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    counts = apportion(sizes, caps, lo)
    picks = {
        n: TensorPick(n, manifest[n].shape, c * s.cols, s)
        for n, c, s in zip(mats, counts, layouts, strict=True)
        if c > 0
    }
    return Selection("rows", {"ff": ff, "ffid": ffid, "slots": slots, "seed": seed}, manifest, picks, k)


def rows_capacity(
    manifest: Manifest, names: list[str], ffid: int, slots: int = DEFAULT_SLOTS, seed: int = 0
) -> int:
    """Elements id ``ffid`` can hold over the matrices among ``names``."""
    out = 0
    for n in matrix_names(manifest, names):
        s = RowSlot.build(n, manifest[n].shape, ffid, slots, seed)
        out += s.capacity * s.cols
    return out


class RowsSelector(SlottedSelector):
    """``rows``: whole rows of every matrix, in a layout of disjoint slots (for projection)."""

    name = "rows"
    whole_rows = True
    help = f"whole rows of every 2-D weight (what projection trains); {DEFAULT_SLOTS} disjoint ids by default"

    def _plan(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], slots: int, seed: int
    ) -> Selection:
        return select_rows(manifest, ff=ff, ffid=ffid, names=names, slots=slots, seed=seed)

    def _capacity(self, manifest: Manifest, names: list[str], ffid: int, slots: int, seed: int) -> int:
        return rows_capacity(manifest, names, ffid, slots, seed)
