"""What a handle reports about itself: routes, gradient paths, and the summary ``describe()``
prints (a mixin of :class:`~ffid.engine.handle.FfidHandle`, kept apart so the handle file holds
only what changes the model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, MismatchError
from . import paths


class HandleReport:
    """Reporting methods of :class:`~ffid.engine.handle.FfidHandle` (they read its slots only)."""

    _slots: dict[str, Any]
    _read_modules: list[Any]
    selection: Any
    proxy_dtype: Any
    model: Any
    parameters: Any  # nn.Module's, through the handle

    def routes(self) -> dict[str, int]:
        """How many tensor uses take each path.

        Paths: ``linear``, ``scaled-linear`` (musubi's ``--fp8_scaled`` weights), ``conv1d``,
        ``patch-conv``, ``generic``, ``in-forward`` (a bias handled by its module's matmul path).
        """
        counts: dict[str, int] = {}
        for slot in self._slots.values():
            for o in slot.owners:
                counts[o.route] = counts.get(o.route, 0) + 1
        return counts

    def scaled_names(self) -> list[str]:
        """Canonical names of the trained weights stored as scaled fp8 (musubi's ``--fp8_scaled``)."""
        return [n for n, s in self._slots.items() if s.scaled is not None]

    def model_dtype(self, name: str) -> Any:
        """The dtype the model stores trained tensor ``name`` in (``None`` for an unknown name)."""
        slot = self._slots.get(name)
        return None if slot is None else slot.param.dtype

    def grad_paths(self) -> dict[str, str]:
        """Canonical name -> the gradient path (``sampled``/``dense``/``chunked``, see
        :mod:`ffid.engine.paths`) the last backward used for each matmul-path weight."""
        return {n: s.pattern.last_path for n, s in self._slots.items() if s.pattern.last_path is not None}

    def pin_grad_paths(self, chosen: Mapping[str, str]) -> None:
        """Force the gradient path of each named weight (e.g. ``grad_paths()`` of an earlier run).

        The paths are exact but round differently. ``auto`` is a fixed rule of shapes, dtype and
        device type, so a resume takes the same paths without this; it serves states written by
        older ffid, whose timed cost model could choose otherwise in another process, and runs
        that must repeat forced paths. Pinned paths win over ``grad_path=`` and
        ``FFID_GRAD_PATH``; all or nothing.
        """
        unknown = [n for n in chosen if n not in self._slots]
        if unknown:
            raise MismatchError(
                f"grad paths given for {len(unknown)} tensor(s) this selection does not train (first: "
                f"{unknown[0]!r}); they come from a run of another selection than "
                f"{self.selection.fingerprint}"
            )
        for n, path in chosen.items():
            if path not in paths.PATHS:
                raise ConfigError(f"grad path {path!r} for {n!r} is not one of {', '.join(paths.PATHS)}")
        for n, path in chosen.items():
            self._slots[n].pattern.grad_path = path

    def describe(self) -> str:
        """A plain summary of what training and attaching change."""
        sel = self.selection
        n = sel.selected
        dev = sorted({str(p.device) for p in self.parameters()}) or ["-"]
        r = self.routes()
        generic = sorted({o.path for s in self._slots.values() for o in s.owners if o.route == "generic"})
        lines = [
            f"ffid {sel.selector} {sel.describe_params()} (selection {sel.fingerprint}) "
            f"on {type(self.model).__name__}:",
            f"  trains {n:,} of {sel.total_params:,} parameters ({n / max(1, sel.total_params):.4%}) "
            f"in {len(self._slots)} tensors",
            f"  proxies: {len(self._slots)} {str(self.proxy_dtype).replace('torch.', '')} tensors "
            f"on {', '.join(dev)} "
            f"({n * self.proxy_dtype.itemsize / 2**20:.2f} MiB); the optimizer must get handle.parameters()",
            "  changes to the model (undone by handle.detach()):",
            "    - requires_grad=False on every model parameter; base weights are never left modified "
            "(handle.merge() writes the trained values)",
            f"    - forward replaced (sparse-gradient matmul path) on {r.get('linear', 0)} Linear, "
            + (f"{r['scaled-linear']} scaled-fp8 Linear, " if r.get("scaled-linear") else "")
            + f"{r.get('conv1d', 0)} Conv1D and {r.get('patch-conv', 0)} patch-conv modules",
            f"    - every read of a touched tensor (module.<name>, from any code path) returns the effective "
            f"tensor: {len(self._read_modules)} modules get a same-named subclass with read properties; "
            f"{len(generic)} tensors are used only through such reads (generic path)"
            + (f": {', '.join(generic[:4])}{' ...' if len(generic) > 4 else ''}" if generic else ""),
        ]
        return "\n".join(lines)
