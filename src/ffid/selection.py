"""A :class:`Selection`: which elements of which tensors a run trains.

A selection maps canonical tensor names to a :class:`TensorPick` (how many elements and a recipe
that produces their flat indices on demand). Indices are generated lazily, tensor by tensor, so
planning a 14B model costs kilobytes, and the engine or a file writer pays O(k) for the k
elements of one tensor only when it needs them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import MismatchError
from .manifest import Manifest

if TYPE_CHECKING:
    import numpy as np
    import torch


class IndexSource(Protocol):
    """Produces the sorted flat indices of the first ``count`` picked elements of one tensor."""

    def indices(self, count: int) -> torch.Tensor: ...

    def key(self) -> str:
        """A string identifying the recipe, for fingerprints."""
        ...


@dataclass(frozen=True)
class Whole:
    """The whole tensor is selected (the compat-v2 selector works at tensor level)."""

    numel: int

    def indices(self, count: int) -> torch.Tensor:
        import torch

        return torch.arange(count, dtype=torch.int64)

    def indices_np(self, count: int) -> np.ndarray:
        import numpy as np
        return np.arange(count, dtype=np.int64)

    def key(self) -> str:
        return "whole"


class Explicit:
    """Indices given explicitly (loaded from a delta file, or found by ``extract``)."""

    def __init__(self, indices: torch.Tensor):
        import torch

        self._indices = indices.to(torch.int64).reshape(-1).sort().values

    def indices(self, count: int) -> torch.Tensor:
        return self._indices[:count]

    def key(self) -> str:
        h = hashlib.blake2b(self._indices.cpu().numpy().tobytes(), digest_size=8)
        return "explicit:" + h.hexdigest()


@dataclass(frozen=True)
class TensorPick:
    """What a selection takes from one tensor."""

    name: str
    shape: tuple[int, ...]
    count: int
    source: Any  # an IndexSource

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def whole(self) -> bool:
        """True when every element of the tensor is selected."""
        return self.count == self.numel

    def indices(self) -> torch.Tensor:
        """Sorted int64 flat indices into ``tensor.reshape(-1)`` (CPU), O(count) time and memory."""
        return self.source.indices(self.count)

    def indices_np(self) -> np.ndarray:
        """:meth:`indices` as an int64 numpy array, without importing torch where the recipe can
        (spread, rows, whole tensors): what file tools such as ``ffid merge`` use."""
        fast = getattr(self.source, "indices_np", None)
        return fast(self.count) if fast is not None else self.source.indices(self.count).numpy()


class Selection(Mapping[str, TensorPick]):
    """The result of a selector: a read-only mapping ``canonical name -> TensorPick``.

    Only touched tensors are keys. ``manifest`` is the model the selection was planned on
    (after ``--include``/``--exclude``: untouched tensors still appear in it).
    """

    def __init__(
        self,
        selector: str,
        params: dict[str, Any],
        manifest: Manifest,
        picks: dict[str, TensorPick],
        target: int,
    ):
        self.selector = selector
        self.params = dict(params)
        self.manifest = manifest
        self._picks = {n: p for n, p in sorted(picks.items()) if p.count > 0}
        self.target = target

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> TensorPick:
        return self._picks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._picks)

    def __len__(self) -> int:
        return len(self._picks)

    def __repr__(self) -> str:
        return (
            f"Selection({self.selector}, {self.describe_params()}, {self.selected:,} of "
            f"{self.total_params:,} params in {len(self)} tensors, fingerprint {self.fingerprint})"
        )

    # -- numbers -----------------------------------------------------------------------------
    @property
    def total_params(self) -> int:
        """Parameters of the whole model (the ``N`` in ``ff * N``)."""
        return self.manifest.total_params

    @property
    def selected(self) -> int:
        """Elements selected, summed over tensors."""
        return sum(p.count for p in self._picks.values())

    @property
    def fraction(self) -> float:
        return self.selected / self.total_params

    def indices(self, name: str) -> torch.Tensor:
        """Sorted flat indices selected in tensor ``name`` (canonical name)."""
        return self._picks[name].indices()

    def describe_params(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items() if v not in (None, [], ()))

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying exactly which elements are selected (not how they were chosen)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.selector.encode())
        for name, pick in self._picks.items():
            h.update(f"|{name}:{','.join(map(str, pick.shape))}:{pick.count}:{pick.source.key()}".encode())
        return h.hexdigest()

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (counts per tensor, no indices)."""
        return {
            "selector": self.selector,
            "params": self.params,
            "fingerprint": self.fingerprint,
            "manifest_fingerprint": self.manifest.fingerprint,
            "total_params": self.total_params,
            "target": self.target,
            "selected": self.selected,
            "tensors": {n: {"shape": list(p.shape), "count": p.count} for n, p in self._picks.items()},
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


def overlap_count(a: TensorPick, b: TensorPick) -> int:
    """Number of flat positions picked by both ``a`` and ``b`` (same tensor)."""
    if a.whole:
        return b.count
    if b.whole:
        return a.count
    fast = getattr(a.source, "overlap", None)
    if fast is not None:
        n = fast(a.count, b.source, b.count)
        if n is not None:
            return int(n)
    import torch  # only here: the O(1) paths above must not pay torch's import time

    ia, ib = a.indices(), b.indices()
    return int(torch.isin(ia, ib, assume_unique=True).sum())


def overlap(a: Selection, b: Selection) -> int:
    """Elements selected by both ``a`` and ``b`` (tensors matched by canonical name).

    Both must be planned on the same model (same manifest fingerprint): positions of two
    different models cannot overlap or be disjoint, so that is a :class:`MismatchError`.
    """
    if a.manifest.fingerprint != b.manifest.fingerprint:
        raise MismatchError(
            f"the selections were planned on different models ({a.manifest.source} and "
            f"{b.manifest.source}; manifest {a.manifest.fingerprint} != {b.manifest.fingerprint}); "
            "plan both on the same model to compare them"
        )
    return sum(overlap_count(a[n], b[n]) for n in a if n in b)
