"""The ``spread`` selector: an exact number of elements from every tensor, disjoint across ids.

How it works (see docs/selectors.md for the guarantees and measurements):

1. **Slots.** Each tensor's ``n`` positions are put in a fixed, pseudo-random-looking but
   structured order (a *rank* for every element, below). The rank range ``[0, n)`` is cut into
   ``slots`` contiguous blocks of ``floor``/``ceil(n / slots)`` ranks; ``--ffid j`` owns block ``j``.
   Different ids own different blocks, so they never share an element, whatever their ``ff``.
2. **Budget.** ``k = round(ff * N)`` elements (``N`` = all parameters) are apportioned to tensors
   as a prefix of one fixed order of *seats*: seat 0 of every tensor first (so every tensor is
   covered), then seat ``i >= 1`` of a tensor with ``n`` elements at time ``(2i - 1) / 2n``
   (Sainte-Lague spacing: there is one rate theta with count = 1 + round(n * theta) for every
   tensor, i.e. each is within half an element of its share of what the coverage seats leave).
   Being a prefix of a fixed order, a larger ``ff`` always keeps every element of a smaller
   one: no Alabama paradox, slices grow in place.
3. **Ranks to elements.** Id ``j`` takes the first ``k_t`` ranks of its block. A rank ``r`` is
   rotated by a per-tensor offset (from a hash of the name, so equal-shaped tensors differ) and
   split into ``row-round = r mod R`` and ``round = r div R`` for the tensor viewed as ``R x C``
   (``R`` = first non-unit dimension). Row-rounds go to rows through a golden-ratio multiplier
   and rounds to columns through a per-row Weyl offset and a second multiplier. Consecutive
   ranks therefore visit every row once before any row twice (row counts differ by at most 1),
   and columns are hit with low discrepancy. Everything is integer arithmetic: no RNG, identical
   on every machine, O(k) time and memory for k elements.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from ..errors import CapacityError, ConfigError
from ..manifest import Manifest
from ..selection import Selection, TensorPick
from .base import Option, Selector

if TYPE_CHECKING:
    import numpy as np

DEFAULT_SLOTS = 16
# Bounds of the options. Looking for a layout that fits takes time linear in slots (about 2.2 s
# for Wan 2.2 14B at 65,536 slots, 28 s at a million), and with more ids than a tensor has
# elements most ids hold none of it; a seed is a 64-bit integer wherever the layout is recorded.
MAX_SLOTS = 2**16
MAX_SEED = 2**63 - 1

# Integer approximations of irrational multipliers, scaled by 1e15 (exact, platform independent).
_GOLDEN = 618_033_988_749_895  # (sqrt(5) - 1) / 2
_SILVER = 414_213_562_373_095  # sqrt(2) - 1
_SCALE = 10**15


def _coprime_multiplier(m: int, frac: int) -> int:
    """The smallest integer >= frac*m that is coprime to m (a bijection step for Z_m)."""
    if m <= 1:
        return 0
    a = max(1, m * frac // _SCALE)
    while math.gcd(a, m) != 1:
        a += 1
    return a


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(R, C)``: rows along the first non-unit dimension, everything else as columns."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    n = math.prod(dims) if dims else 1
    if len(dims) <= 1:
        return n, 1
    return dims[0], n // dims[0]


@dataclass(frozen=True)
class SpreadSlot:
    """The rank -> element map of one tensor and the rank block one id owns in it."""

    numel: int
    rows: int
    cols: int
    offset: int  # rotation of ranks, from the name hash
    row_mult: int
    col_mult: int
    col_shift: int
    lo: int  # first rank of this id's block
    capacity: int  # size of this id's block

    @classmethod
    def build(cls, name: str, shape: tuple[int, ...], ffid: int, slots: int, seed: int) -> SpreadSlot:
        rows, cols = matrix_view(shape)
        n = rows * cols
        digest = hashlib.blake2b(f"ffid-spread:{seed}:{name}".encode(), digest_size=8).digest()
        offset = int.from_bytes(digest, "little") % n if n else 0
        lo = ffid * n // slots
        hi = (ffid + 1) * n // slots
        return cls(
            numel=n,
            rows=rows,
            cols=cols,
            offset=offset,
            row_mult=_coprime_multiplier(rows, _GOLDEN),
            col_mult=_coprime_multiplier(cols, _GOLDEN),
            col_shift=_coprime_multiplier(cols, _SILVER),
            lo=lo,
            capacity=hi - lo,
        )

    def elements(self, ranks):  # type: ignore[no-untyped-def]
        """Flat element index of each rank (int64 tensor in, int64 tensor out).

        ``ranks`` is consumed (overwritten): the map works in place so that at most three
        int64 vectors of length k are alive at once (24 bytes per selected element).
        """
        r = ranks.add_(self.offset).remainder_(self.numel)
        if self.cols == 1:
            return r.mul_(self.row_mult).remainder_(self.rows) if self.rows > 1 else r.zero_()
        rho = r % self.rows
        q = r.div_(self.rows, rounding_mode="floor")
        shift = rho * self.col_shift
        col = q.add_(shift.remainder_(self.cols)).remainder_(self.cols)
        col.mul_(self.col_mult).remainder_(self.cols)
        del shift
        row = rho.mul_(self.row_mult).remainder_(self.rows) if self.rows > 1 else rho.zero_()
        return row.mul_(self.cols).add_(col)

    def indices(self, count: int):  # type: ignore[no-untyped-def]
        """:meth:`indices_np` as a torch tensor (sharing its memory)."""
        import torch

        if torch.compiler.is_compiling():
            # The engine may first need them inside a torch.compile region, where dynamo traces
            # torch ops but not numpy's masked in-place subtraction: the torch map, same indices.
            if count > self.capacity:
                raise CapacityError(f"asked for {count} elements from a slot holding {self.capacity}")
            out = self.elements(torch.arange(self.lo, self.lo + count, dtype=torch.int64))
            out.numpy().sort()
            return out
        return torch.from_numpy(self.indices_np(count))

    def indices_np(self, count: int) -> np.ndarray:
        """The sorted flat indices of this id's first ``count`` ranks: :meth:`elements` of them,
        computed without a division per element (see :meth:`_segment`) and without torch, so that
        ``ffid merge`` rebuilding an implicit-index delta stays as light as with a stored index."""
        import numpy as np
        if count > self.capacity:
            raise CapacityError(f"asked for {count} elements from a slot holding {self.capacity}")
        start = (self.lo + self.offset) % self.numel if self.numel else 0
        # The rotated ranks are one contiguous range of [0, numel), or two when it wraps around.
        first = min(count, self.numel - start)
        parts = [self._segment(start, start + first)]
        if count > first:
            parts.append(self._segment(0, count - first))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        del parts
        # numpy sorts in place; torch.sort would also allocate an int64 permutation (8 more bytes each).
        out.sort()
        return out

    def _segment(self, a: int, b: int) -> np.ndarray:
        """Elements of the rotated ranks ``a .. b-1`` (``0 <= a <= b <= numel``), in no order.

        The same map as :meth:`elements`, evaluated round by round: a rank ``r`` is row-round
        ``rho = r mod R`` of round ``q = r div R``, so the row part ``row(rho) * C`` and the column
        shift ``shift(rho)`` are tables of R entries, the column multiplier a table of C entries,
        and each element costs an add, a compare and two table reads. Integer division per element
        made rebuilding a 14B model's indices (an implicit-index delta) take about a minute.
        """
        import numpy as np
        rows, cols = self.rows, self.cols
        if b <= a:
            return np.empty(0, dtype=np.int64)
        rho = np.arange(rows, dtype=np.int64)
        row_base = (rho * self.row_mult % rows if rows > 1 else np.zeros(rows, np.int64)) * cols
        shift = rho * self.col_shift % cols
        col_of = np.arange(cols, dtype=np.int64) * self.col_mult % cols
        del rho
        q_a, rho_a = divmod(a, rows)
        q_b, rho_b = divmod(b, rows)

        def block(q_lo: int, q_hi: int, lo: int, hi: int) -> np.ndarray:
            # Rounds q_lo..q_hi-1, row-rounds lo..hi-1 of each: q + shift < 2C, so one subtraction wraps it.
            x = np.arange(q_lo, q_hi, dtype=np.int64)[:, None] + shift[None, lo:hi]
            np.subtract(x, cols, out=x, where=x >= cols)
            out = col_of[x]
            del x
            out += row_base[None, lo:hi]
            return out.reshape(-1)

        if q_a == q_b:
            return block(q_a, q_a + 1, rho_a, rho_b)
        parts = [block(q_a, q_a + 1, rho_a, rows)]
        if q_b > q_a + 1:
            parts.append(block(q_a + 1, q_b, 0, rows))
        if rho_b:
            parts.append(block(q_b, q_b + 1, 0, rho_b))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def key(self) -> str:
        return f"spread:{self.offset}:{self.lo}"

    def overlap(self, count: int, other: object, other_count: int) -> int | None:
        """Shared elements with another slot of the same tensor layout, in O(1); None if not comparable."""
        if not isinstance(other, SpreadSlot):
            return None
        same_layout = (self.numel, self.rows, self.cols, self.offset) == (
            other.numel,
            other.rows,
            other.cols,
            other.offset,
        )
        if not same_layout:
            return None
        return max(0, min(self.lo + count, other.lo + other_count) - max(self.lo, other.lo))


def _floor_digits(x: float, digits: int = 6) -> str:
    """``x`` cut (not rounded) to ``digits`` significant digits, so that a suggested --ff fits."""
    if x <= 0:
        return "0"
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return f"{math.floor(x * scale) / scale:.{digits}g}"


def target_count(ff: float, total: int) -> int:
    """``round(ff * total)`` computed exactly, halves rounded up."""
    exact = Fraction(ff) * total
    return math.floor(exact + Fraction(1, 2))


def apportion(sizes: list[int], caps: list[int], k: int) -> list[int]:
    """Split ``k`` seats among tensors of ``sizes`` (at most ``caps``), as a prefix of a fixed order.

    Seat 0 of each tensor comes first (ties: larger tensors, then list order), then seat ``i >= 1``
    of a tensor of size ``n`` at time ``(2i - 1) / (2n)``. The answer for a larger ``k`` contains
    the answer for a smaller one, tensor by tensor.
    """
    if k > sum(caps):
        raise ValueError("k exceeds the total capacity")
    order = sorted(range(len(sizes)), key=lambda t: (-sizes[t], t))
    rank_of = {t: pos for pos, t in enumerate(order)}
    covered = [t for t in order if caps[t] > 0]
    counts = [0] * len(sizes)
    if k <= len(covered):
        for t in covered[:k]:
            counts[t] = 1
        return counts

    # Seats with time <= p / D, for an integer p: D even so that halves are exact.
    denom = 1 << 64

    def count_at(p: int) -> list[int]:
        return [
            min(c, 1 + (n * p + denom // 2) // denom) if c > 0 else 0
            for n, c in zip(sizes, caps, strict=True)
        ]

    lo, hi = 0, 2 * denom  # time 1 covers every seat of every tensor
    while lo < hi:  # largest p with total <= k
        mid = (lo + hi + 1) // 2
        if sum(count_at(mid)) <= k:
            lo = mid
        else:
            hi = mid - 1
    counts = count_at(lo)
    missing = k - sum(counts)
    if missing:
        # The remaining seats all have times in (lo/D, (lo+1)/D]; take them in exact order.
        heap = [
            (Fraction(2 * counts[t] - 1, 2 * sizes[t]), rank_of[t], t)
            for t in range(len(sizes))
            if counts[t] < caps[t]
        ]
        heapify(heap)
        for _ in range(missing):
            _, r, t = heappop(heap)
            counts[t] += 1
            if counts[t] < caps[t]:
                heappush(heap, (Fraction(2 * counts[t] - 1, 2 * sizes[t]), r, t))
    return counts


def _check_id(ffid: int, slots: int) -> None:
    if not 0 <= ffid < slots:
        raise ConfigError(
            f"--ffid {ffid} is outside the layout's ids 0..{slots - 1}; use an id in that range "
            f"or a layout with more slots (--slots {max(ffid + 1, slots)}, which lowers each id's capacity)"
        )


def select_spread(
    manifest: Manifest,
    *,
    ff: float,
    ffid: int,
    names: list[str],
    slots: int = DEFAULT_SLOTS,
    seed: int = 0,
) -> Selection:
    """Plan a ``spread`` selection over ``names`` (a subset of ``manifest``) for ``ff`` / ``ffid``."""
    if not isinstance(slots, int) or slots < 1:
        raise ConfigError(f"--slots {slots!r} must be a positive integer; the default is {DEFAULT_SLOTS}")
    _check_id(ffid, slots)
    total = manifest.total_params
    k = target_count(ff, total)
    if k < 1:
        raise ConfigError(
            f"--ff {ff} selects no element of a model with {total:,} parameters; use --ff >= {1 / total:.3g}"
        )
    infos = [manifest[n] for n in names]
    layouts = [SpreadSlot.build(t.name, t.shape, ffid, slots, seed) for t in infos]
    caps = [s.capacity for s in layouts]
    capacity = sum(caps)
    if k > capacity:
        # Suggest the most slots whose *every* id holds k (each id gets at least floor(n / s) per tensor).
        sizes = [t.numel for t in infos]
        best = next((s for s in range(slots - 1, 0, -1) if sum(n // s for n in sizes) >= k), 0)
        most = _floor_digits(capacity / total)
        hint = f"lower --ff to at most {most}"
        if best:
            hint += (
                f", or use fewer slots (--slots {best}: ids 0..{best - 1}, each holding at least "
                f"{_floor_digits(100 * sum(n // best for n in sizes) / total)}% of the model; selections of "
                "different layouts are not disjoint)"
            )
        raise CapacityError(
            f"--ff {ff} asks for {k:,} elements but id {ffid} of the {slots}-slot layout holds "
            f"{capacity:,} here ({capacity / total:.4%} of the model); {hint}"
        )
    counts = apportion([t.numel for t in infos], caps, k)
    picks = {
        t.name: TensorPick(t.name, t.shape, c, layout)
        for t, c, layout in zip(infos, counts, layouts, strict=True)
        if c > 0
    }
    params = {"ff": ff, "ffid": ffid, "slots": slots, "seed": seed}
    return Selection("spread", params, manifest, picks, k)


def spread_capacity(
    manifest: Manifest, names: list[str], ffid: int, slots: int = DEFAULT_SLOTS, seed: int = 0
) -> int:
    """Elements id ``ffid`` can hold over ``names`` in the layout (the largest usable ``ff * N``)."""
    return sum(
        SpreadSlot.build(manifest[n].name, manifest[n].shape, ffid, slots, seed).capacity for n in names
    )


class SlottedSelector(Selector):
    """A layout of ``slots`` disjoint ids under a layout seed, the frame ``spread`` and ``rows``
    share: subclasses give :meth:`_plan` and :meth:`_capacity`, everything else is here."""

    options = (
        Option("slots", DEFAULT_SLOTS, 1, "the number of disjoint ids in the layout", MAX_SLOTS),
        Option("seed", 0, 0, "the layout seed; other seeds give unrelated layouts", MAX_SEED),
    )

    def _plan(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], slots: int, seed: int
    ) -> Selection:
        raise NotImplementedError

    def _capacity(self, manifest: Manifest, names: list[str], ffid: int, slots: int, seed: int) -> int:
        raise NotImplementedError

    def _most_fitting_slots(self, ff: float, options: Mapping[str, int]) -> int:
        """The largest slot count :meth:`fitting_options` tries (fewer slots: more per id)."""
        return int(options["slots"]) - 1

    def ids(self, options: Mapping[str, int]) -> int:
        return int(options["slots"])

    def check_ffid(self, ffid: int, options: Mapping[str, int]) -> None:
        _check_id(ffid, self.ids(options))

    def select(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], options: Mapping[str, int]
    ) -> Selection:
        return self._plan(
            manifest, ff=ff, ffid=ffid, names=names, slots=int(options["slots"]), seed=int(options["seed"])
        )

    def capacity(
        self, manifest: Manifest, names: list[str], ffid: int, options: Mapping[str, int]
    ) -> int | None:
        return self._capacity(manifest, names, ffid, int(options["slots"]), int(options["seed"]))

    def fitting_options(
        self, manifest: Manifest, names: list[str], ff: float, ffid: int, options: Mapping[str, int]
    ) -> dict[str, int] | None:
        k = target_count(ff, manifest.total_params)
        for slots in range(self._most_fitting_slots(ff, options), ffid, -1):
            if self._capacity(manifest, names, ffid, slots, int(options["seed"])) >= k:
                return {**options, "slots": slots}
        return None


class SpreadSelector(SlottedSelector):
    """``spread``: an exact element budget from every tensor, in a layout of disjoint slots."""

    name = "spread"
    help = f"exact element budget from every tensor; {DEFAULT_SLOTS} disjoint ids by default"

    def _plan(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], slots: int, seed: int
    ) -> Selection:
        return select_spread(manifest, ff=ff, ffid=ffid, names=names, slots=slots, seed=seed)

    def _capacity(self, manifest: Manifest, names: list[str], ffid: int, slots: int, seed: int) -> int:
        return spread_capacity(manifest, names, ffid, slots, seed)

    def _most_fitting_slots(self, ff: float, options: Mapping[str, int]) -> int:
        # an id of more than 1/ff slots holds about N * (1/slots) < ff * N: not worth planning
        return min(int(options["slots"]) - 1, int(1 / ff))
