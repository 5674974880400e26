"""Saving a whole model with the trained values applied, streaming one tensor at a time."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .._version import __version__
from ..dtypes import dtype_code, parse_dtype
from ..errors import AttachError, ConfigError
from ..names import canonical_name
from .delta_format import preset_for, training_metadata
from .stio import write_safetensors_stream


def save_full(
    handle: Any,
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    architecture: str | None = None,
) -> int:
    """Write the whole model of ``handle`` with its trained values to one safetensors file.

    Keys are the model's canonical state-dict names; float tensors are cast to ``dtype`` when
    given (integer buffers keep theirs). ``handle.effective_state(dtype)`` yields one tensor at
    a time, so memory holds one tensor beyond the model. Returns the file size.
    """
    out_dtype = parse_dtype(dtype)
    model = handle.model
    # The header comes first, so names, shapes and dtypes are taken from the state dict (no copies).
    entries = []
    for key, t in model.state_dict(keep_vars=True).items():
        code = dtype_code(out_dtype if out_dtype is not None and t.is_floating_point() else t.dtype)
        entries.append((canonical_name(key), code, tuple(t.shape)))
    seen: set[str] = set()
    dup = next((e[0] for e in entries if e[0] in seen or seen.add(e[0])), None)
    if dup is not None:
        raise ConfigError(f"two state-dict entries canonicalise to {dup!r}; unwrap the model before saving")
    stream = iter(handle.effective_state(out_dtype))

    def produce(key: str) -> torch.Tensor:
        try:
            got_key, tensor = next(stream)
        except StopIteration:
            raise AttachError(
                f"the handle's effective state ended before {key!r}; the model changed after attach"
            ) from None
        if canonical_name(got_key) != key:
            raise AttachError(
                f"the handle yielded {got_key!r} where the state dict has {key!r}; the model changed "
                "after attach"
            )
        return tensor

    sel = handle.selection
    meta = training_metadata(
        selector=sel.selector,
        params=sel.params,
        architecture=architecture or preset_for(sel.manifest.fingerprint) or type(model).__name__,
        title=os.path.splitext(os.path.basename(os.fspath(path)))[0],
        suffix="ffid-full",
    )
    meta.update(
        {
            "ffid.format": "ffid-full",
            "ffid.version": __version__,
            "ffid.selector": sel.selector,
            "ffid.params": json.dumps(dict(sel.params), sort_keys=True, default=str),
            "ffid.selection_fingerprint": sel.fingerprint,
        }
    )
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    # State-dict order, unsorted: effective_state yields in that order and is consumed as it comes.
    return write_safetensors_stream(path, entries, produce, meta, align=False)
