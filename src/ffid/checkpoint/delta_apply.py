"""Applying a delta to an ``nn.Module`` in place: :func:`apply_delta` (and :func:`blend`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError, MismatchError
from ..names import canonical_name
from .delta_format import DeltaTensor, sample_positions, values_hash
from .delta_read import Delta, load_delta
from .namemap import NameResolver
from .stio import (
    require_finite,
    require_finite_scalar,
)

if TYPE_CHECKING:
    import torch


# -- applying to a module ----------------------------------------------------------------------------
def blend(base: torch.Tensor, trained: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``base + multiplier * (trained - base)`` in fp32; exactly ``trained`` when the multiplier is 1."""
    import torch

    trained = trained.to(torch.float32)
    if multiplier == 1.0:
        return trained
    base = base.to(torch.float32)
    return base + multiplier * (trained - base)


@dataclass
class ApplyResult:
    """What :func:`apply_delta` changed."""

    tensors: int
    elements: int
    renamed: dict[str, str] = field(default_factory=dict)  # delta name -> module name, where they differ


def _module_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t.is_floating_point():
            found.setdefault(canonical_name(name), t)
    return found


def apply_delta(
    model: torch.nn.Module,
    delta: Delta | str | os.PathLike[str],
    multiplier: float = 1.0,
    *,
    verify: bool = True,
) -> ApplyResult:
    """Write a delta's values into ``model``'s weights in place (for inference in any PyTorch code).

    Each touched position becomes ``base + multiplier * (trained - base)``. With ``verify`` the
    model's current values are checked against the delta's base fingerprint first, so a delta
    is never applied to another model or applied twice; nothing is changed unless every tensor
    checks out. Diffusers and original Wan names are mapped onto each other.
    """
    import torch

    multiplier = require_finite_scalar(multiplier, "multiplier")
    if not isinstance(delta, Delta):
        delta = load_delta(delta, base=model)  # an implicit-index delta rebuilds its positions here
    targets = _module_tensors(model)
    resolver = NameResolver(targets, delta.info.naming)
    plan: list[tuple[DeltaTensor, torch.Tensor]] = []
    renamed = {}
    for name, dt in delta.tensors.items():
        target_name = resolver.resolve(name)
        if target_name is None:
            raise MismatchError(
                f"delta tensor {name!r} has no counterpart in {type(model).__name__}; the delta was made for "
                "another model (see `ffid inspect` on the delta)"
            )
        if target_name != name:
            renamed[name] = target_name
        t = targets[target_name]
        if tuple(t.shape) != dt.shape:
            raise MismatchError(
                f"tensor {target_name!r} has shape {tuple(t.shape)} in the model but {dt.shape} in the "
                "delta; "
                "the delta was made for another model size"
            )
        if t.device.type == "meta":
            raise ConfigError(
                f"tensor {target_name!r} is on the meta device; load the weights before applying"
            )
        if verify:
            fp = delta.info.base_fingerprint[name]
            pos = dt.indices[sample_positions(dt.count)]
            current = t.detach().reshape(-1)[pos.to(t.device)]
            if values_hash(current) != fp.hash:
                raise MismatchError(
                    f"tensor {target_name!r} does not hold the base values the delta was trained from (first "
                    "mismatching tensor); it belongs to another base model or was already applied: pass "
                    "verify=False only if you are sure"
                )
        plan.append((dt, t))
    elements = 0
    with torch.no_grad():
        for dt, t in plan:
            flat = t.data.view(-1) if t.is_contiguous() else None
            if flat is None:
                raise ConfigError(
                    f"tensor {dt.name!r} is not contiguous; call .contiguous() on the model first"
                )
            idx = dt.indices.to(t.device)
            new = blend(flat[idx], dt.values.to(t.device), multiplier)
            new = new.to(t.dtype)
            require_finite(
                new,
                f"tensor {dt.name!r} with multiplier {multiplier!r} applied",
                "the result overflows the model's dtype: use a smaller multiplier",
                ConfigError,
            )
            flat[idx] = new
            elements += dt.count
    return ApplyResult(len(plan), elements, renamed)
