"""How reads of a touched tensor return the effective tensor: read classes and :class:`EffectiveTensor`.

Step 3 of :mod:`ffid.engine.handle`'s docstring. The module's class is swapped for a subclass of
the same name with one property per touched attribute (as ``torch.nn.utils.parametrize`` does);
the property asks the handle registered in the instance's ``__dict__`` for the tensor to return.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Instance __dict__ key of a module with touched tensors: {attr: (handle, slot)}.
READS_KEY = "_ffid_reads"
# Original class -> its read class (same name, one property per touched attribute).
_READ_CLASSES: dict[type, type] = {}


class EffectiveTensor(torch.Tensor):
    """What reading a touched tensor through its module attribute returns while attached.

    A plain tensor for every operation (results are ordinary tensors; gradients flow to the
    proxy), except ``.data``: reading it gives the *base* Parameter's data and assigning it
    replaces the base Parameter's data. Block-swap code (``module.weight.data = moved``) and
    offloaders therefore keep moving the stored weight, never a computed copy. In-place writes
    through the attribute itself (``module.weight.copy_(...)``) change only this copy: write to
    ``module.weight.data`` or ``module._parameters[name]`` instead.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl
    _ffid_base: torch.Tensor

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return self._ffid_base.data

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._ffid_base.data = value


def read_property(attr: str) -> property:
    """The class-level property that serves ``module.<attr>``: the effective tensor for an instance
    that has a read registered for ``attr``, otherwise exactly what ``nn.Module`` would return."""

    def get(module: nn.Module) -> Any:
        d = module.__dict__
        params = d["_parameters"]
        if attr in params:
            base = params[attr]
            reads = d.get(READS_KEY)
            entry = reads.get(attr) if reads else None
            if entry is None or base is None:
                return base
            return entry[0]._read(entry[1], base)
        if attr in d:  # a plain attribute stored after the Parameter was removed
            return d[attr]
        return nn.Module.__getattr__(module, attr)

    def set_(module: nn.Module, value: Any) -> None:  # reached only when attr is not a Parameter
        module.__dict__[attr] = value

    def delete(module: nn.Module) -> None:
        if module.__dict__.pop(attr, None) is None:
            raise AttributeError(attr)

    return property(get, set_, delete, doc=f"ffid: effective {attr!r} while attached")


def read_class(cls: type, attrs: set[str]) -> type:
    """The read class of ``cls`` (created once, same name/module), with properties for ``attrs``."""
    if cls.__dict__.get("_ffid_read_class"):
        sub = cls
    else:
        sub = _READ_CLASSES.get(cls)
        if sub is None:
            sub = type(
                cls.__name__,
                (cls,),
                {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_ffid_read_class": True},
            )
            _READ_CLASSES[cls] = sub
    for attr in attrs:
        if not isinstance(sub.__dict__.get(attr), property):
            setattr(sub, attr, read_property(attr))
    return sub


def original_class(cls: type) -> type:
    return cls.__mro__[1] if cls.__dict__.get("_ffid_read_class") else cls
