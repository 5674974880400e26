"""Which tensors a selection touches on a model, and who owns them: :class:`Slot` (one per
touched Parameter: its positions and the proxy's name) and :class:`Owner` (a module attribute
holding it; tied weights have several), resolved and checked by :func:`resolve` before
:class:`~ffid.engine.handle.FfidHandle` changes anything on the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import AttachError, MismatchError
from ..names import canonical_name
from ..selection import Selection
from .kernels import FP8_DTYPES, Pattern
from .scaled import SCALE_KEY, check_scale, read_at, scale_of


def escape(name: str) -> str:
    """Proxy parameter name for a canonical tensor name (``.`` is not allowed in parameter names)."""
    return name.replace(".", "/")


def scatter_(flat: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``flat[idx] = values`` in ``flat``'s dtype; 1-byte floats are written through a uint8 view
    because index_put is not implemented for them on every device."""
    values = values.to(device=flat.device, dtype=flat.dtype)
    if flat.dtype in FP8_DTYPES:
        flat.view(torch.uint8)[idx] = values.view(torch.uint8)
    else:
        flat[idx] = values


@dataclass
class Owner:
    module: nn.Module
    attr: str
    path: str  # module path in the model, for messages
    route: str = (
        "generic"  # linear, scaled-linear, conv1d, patch-conv, generic, in-forward (a patched module's bias)
    )


@dataclass
class Slot:
    name: str  # canonical name
    key: str  # proxy parameter name
    # the base Parameter seen at attach (ffid never replaces it; a musubi expert switch assigns
    # the module another one, which the forwards read at call time)
    param: nn.Parameter
    pattern: Pattern  # the selected positions (compact, per compute device; none on the host)
    owners: list[Owner] = field(default_factory=list)
    # the module whose scale_weight scales this fp8 weight (musubi's --fp8_scaled), else None
    scaled: nn.Module | None = None

    @property
    def whole(self) -> bool:
        return self.pattern.whole

    @property
    def count(self) -> int:
        return self.pattern.count

    def idx_on(self, device: torch.device, cache: bool = True) -> torch.Tensor:
        return self.pattern.flat(device, cache=cache)

    def scale(self) -> torch.Tensor:
        """The scale_weight of a scaled slot (read at call time: block swap may move it)."""
        assert self.scaled is not None
        return self.scaled._buffers[SCALE_KEY]  # type: ignore[return-value]

    def values(self, base: torch.Tensor) -> torch.Tensor:
        """The values the model computes with at the selected positions of ``base`` (fp32 CPU): the
        stored values, or fp8 x scale for a scaled weight."""
        idx = self.idx_on(base.device, cache=False)
        return read_at(base, self.scale() if self.scaled is not None else None, idx).cpu()


def resolve(
    model: nn.Module, selection: Selection, grad_path: str | None, attached: Mapping[nn.Module, Any]
) -> tuple[list[Slot], dict[str, Slot]]:
    """The slots of ``selection`` on ``model`` and every canonical name of their Parameters.

    Validates everything (names, shapes, dtypes, devices, owners, scaled-fp8 scales) before the
    caller touches the model. ``attached`` maps modules already patched by a live handle.
    """
    by_param: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append((name, p))
    canon: dict[str, nn.Parameter] = {}
    first: dict[int, str] = {}
    for pid, names in by_param.items():
        first[pid] = canonical_name(names[0][0])
        for n, p in names:
            canon[canonical_name(n)] = p

    missing = [n for n in selection if n not in canon]
    if missing:
        raise MismatchError(
            f"the selection names {len(missing)} tensor(s) the model does not have "
            f"(first: {missing[0]!r}); "
            f"it was planned for another model (selection {selection.fingerprint}): plan it on this model"
        )
    seen: dict[int, str] = {}
    slots = []
    for name, pick in selection.items():
        p = canon[name]
        if tuple(p.shape) != tuple(pick.shape):
            raise MismatchError(
                f"tensor {name!r} has shape {tuple(p.shape)} in the model but {tuple(pick.shape)} in the "
                f"selection; it was planned for another model: plan it on this model"
            )
        if id(p) in seen:
            raise MismatchError(
                f"the selection picks both {seen[id(p)]!r} and {name!r}, which are the same tied tensor; "
                "plan on the model itself (tied tensors are listed once)"
            )
        if p.device.type == "meta":
            raise AttachError(
                f"tensor {name!r} is on the meta device (no values); load the weights before attaching"
            )
        if not p.dtype.is_floating_point:
            raise MismatchError(
                f"tensor {name!r} is {p.dtype}, not a floating-point weight; it cannot be trained"
            )
        seen[id(p)] = name
        # Checked once here, then dropped: the indices are regenerated from the selection
        # where they are needed, so no int64 host copy lives for the whole run.
        flat = pick.indices()
        if flat.numel() != pick.count or (flat.numel() and int(flat[-1]) >= p.numel()):
            raise MismatchError(f"selection indices of {name!r} do not fit its {p.numel()} elements")
        del flat
        pattern = Pattern(pick.indices, pick.count, p.numel(), pick.whole)
        pattern.grad_path = grad_path
        slots.append(Slot(name, escape(name), p, pattern))

    # Owners: every (module, attr) holding a touched Parameter; tied weights have several.
    wanted = {id(s.param): s for s in slots}
    for path, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None and id(p) in wanted:
                slot = wanted[id(p)]
                if any(o.module is module and o.attr == attr for o in slot.owners):
                    continue
                if module in attached:
                    raise AttachError(
                        f"{path or type(model).__name__} is already attached to an ffid handle; call "
                        "handle.detach() on the first one before attaching again"
                    )
                where = f"{path}.{attr}" if path else attr
                scale = scale_of(module, attr)
                if scale is not None:
                    why = check_scale(where, p, scale)
                    if why is not None:
                        raise AttachError(f"{why}; exclude it from the selection (musubi: exclude=REGEX)")
                    if slot.scaled is not None and slot.scaled is not module:
                        raise AttachError(
                            f"{where} is a scaled fp8 weight tied to another module; exclude it"
                        )
                    slot.scaled = module
                elif slot.scaled is not None or (SCALE_KEY in module._buffers and attr == "weight"):
                    raise AttachError(
                        f"{where} has a scale_weight but is not a scaled fp8 Linear weight; exclude it from "
                        "the selection (musubi: --network_args exclude=REGEX)"
                    )
                slot.owners.append(Owner(module, attr, where))
    aliases: dict[str, Slot] = {}
    for s in slots:
        for n, _ in by_param[id(s.param)]:
            aliases[canonical_name(n)] = s
        if not s.owners:
            raise AttachError(f"tensor {s.name!r} is not owned by any module of the model; cannot attach")
    return slots, aliases
