"""The selected positions of one tensor, as the engine keeps them on each compute device.

Kept apart from :mod:`ffid.engine.kernels` (which uses patterns in the matmul autograd Function)
and :mod:`ffid.engine.paths` (which computes a pattern's gradient): both need the class, so it
sits below both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dtypes import device_index_dtype


class Pattern:
    """Selected positions of one tensor, with one compact index tensor per compute device.

    The flat positions are kept once per device where they are used, as int32 (int64 from 2**31
    elements on): 4 bytes per selected element. Nothing is kept on the host: ``source()`` (the
    selection's recipe, O(k)) regenerates the int64 positions when a new device needs them or a
    save/merge wants them. Tensors on the matmul path (:meth:`matrix`) also get CSR row pointers
    (``rows + 1`` entries) per device; their CSR column indices are derived per call (``flat %
    cols``, transient). Whole-tensor picks keep no indices at all.
    """

    def __init__(self, source: Callable[[], torch.Tensor], count: int, numel: int, whole: bool):
        self.source, self.count, self.numel, self.whole = source, count, numel, whole
        self.rows, self.cols = 1, numel
        self.itype = device_index_dtype(numel)
        self._flat: dict[torch.device, torch.Tensor] = {}
        self._crow: dict[torch.device, torch.Tensor] = {}
        self._blocks: dict[tuple[int, int, int], list[tuple[int, int, int, int]]] = {}
        self.grad_path: str | None = None  # forced gradient path (attach option), None = auto/env
        self.last_path: str | None = None  # the path the last backward used

    def matrix(self, rows: int, cols: int) -> Pattern:
        """View the tensor as ``[rows, cols]`` (for the matmul path); returns ``self``."""
        if rows * cols != self.numel:
            raise ValueError(f"a [{rows}, {cols}] view does not fit {self.numel} elements")
        if (rows, cols) != (self.rows, self.cols):
            self.rows, self.cols = rows, cols
            self._crow.clear()
            self._blocks = {}
        return self

    def host(self) -> torch.Tensor:
        """Sorted int64 CPU flat positions, regenerated from the selection (not kept)."""
        if self.whole:
            return torch.arange(self.numel, dtype=torch.int64)
        return self.source().to(torch.int64)

    def flat(self, device: torch.device, cache: bool = True) -> torch.Tensor:
        """Flat positions on ``device`` (compact dtype); cached unless ``cache=False``, which
        returns a transient copy when none is cached there (saves and merges of offloaded
        weights must not leave host copies behind)."""
        device = torch.device(device)
        found = self._flat.get(device)
        if found is None:
            found = self.host().to(device=device, dtype=self.itype)
            if cache:
                self._flat[device] = found
        return found

    def crow(self, device: torch.device) -> torch.Tensor:
        """CSR row pointers ``[rows + 1]`` on ``device`` for the ``[rows, cols]`` view."""
        device = torch.device(device)
        found = self._crow.get(device)
        if found is None:
            r = self.flat(device).long() // self.cols
            found = torch.zeros(self.rows + 1, dtype=torch.int64, device=device)
            found[1:] = torch.bincount(r, minlength=self.rows).cumsum(0)
            found = found.to(self.itype)
            self._crow[device] = found
        return found

    def tensors(self) -> list[torch.Tensor]:
        """Every index tensor this pattern keeps (for memory accounting)."""
        return [*self._flat.values(), *self._crow.values()]

    def drop_cache(self) -> None:
        self._flat.clear()
        self._crow.clear()
        self._blocks = {}

    def row_blocks(self, block_rows: int, device: torch.device) -> list[tuple[int, int, int, int]]:
        """``(r0, r1, start, end)`` per block of ``block_rows`` rows of the ``[rows, cols]`` view:
        the selection-order slice ``[start, end)`` holds that block's entries (host ints, cached)."""
        key = (block_rows, self.rows, self.cols)
        found = self._blocks.get(key)
        if found is None:
            crow = self.crow(device).tolist()
            found = [
                (r0, min(self.rows, r0 + block_rows), crow[r0], crow[min(self.rows, r0 + block_rows)])
                for r0 in range(0, self.rows, block_rows)
            ]
            self._blocks = {key: found}
        return found
