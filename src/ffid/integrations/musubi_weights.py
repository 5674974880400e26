"""A delta from the tensors musubi-tuner hands over: ``--network_weights`` / ``--base_weights``
load a file with ``safetensors.load_file``, which drops its metadata, so the delta is rebuilt
from the tensors and the model's shapes (see :mod:`ffid.integrations.musubi`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import MismatchError, ModelFileError
from ..names import canonical_name


def _delta_from_weights(weights: Mapping[str, torch.Tensor], model: nn.Module) -> Any:
    """A :class:`~ffid.checkpoint.delta.Delta` from a delta file's tensors (metadata lost by musubi's
    ``load_file``): shapes come from ``model``, so it can be applied or trained on again."""
    from ..checkpoint.delta import (
        FORMAT_VERSION,
        INDEX_SUFFIX,
        VALUE_SUFFIX,
        Delta,
        DeltaInfo,
        DeltaTensor,
        is_text_key,
    )
    from ..checkpoint.namemap import NameResolver, detect_naming

    # the stored text encodings (ffid.text.*) are for preservation, not weights: read from the
    # file itself where needed (ffid.integrations.musubi_encodings)
    names = sorted(k[: -len(VALUE_SUFFIX)] for k in weights if k.endswith(VALUE_SUFFIX))
    stray = [k for k in weights if not k.endswith((VALUE_SUFFIX, INDEX_SUFFIX)) and not is_text_key(k)]
    if not names or stray:
        first = stray[0] if stray else next(iter(weights), "nothing")
        raise ModelFileError(
            f"these weights are not an ffid delta (tensor {first!r}); --base_weights / --network_weights "
            "with ffid.integrations.musubi take files written by ffid (save_weights, `ffid extract`)"
        )
    targets: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        targets.setdefault(canonical_name(n), p)
    naming = detect_naming(names)
    resolver = NameResolver(targets, naming)
    tensors = {}
    for name in names:
        target = resolver.resolve(name)
        if target is None:
            raise MismatchError(
                f"delta tensor {name!r} has no counterpart in {type(model).__name__}; the delta was made for "
                "another model"
            )
        shape = tuple(targets[target].shape)
        numel = targets[target].numel()
        values = weights[name + VALUE_SUFFIX].reshape(-1)
        idx = weights.get(name + INDEX_SUFFIX)
        if idx is None and values.numel() != numel:
            # musubi hands over the tensors without the file's metadata, which an implicit-index
            # delta (format 2) needs to rebuild its positions.
            raise ModelFileError(
                f"delta tensor {name!r} stores {values.numel()} values but no positions: an implicit-index "
                "delta (format 2), which musubi's loader cannot rebuild; convert it first with `ffid convert "
                "DELTA --indices explicit -o DELTA_EXPLICIT` (add --base DIT for a non-preset model)"
            )
        indices = torch.arange(numel, dtype=torch.int64) if idx is None else idx.reshape(-1).to(torch.int64)
        if indices.numel() != values.numel() or (indices.numel() and int(indices.max()) >= numel):
            raise MismatchError(
                f"delta tensor {name!r} has {values.numel()} values for {indices.numel()} positions "
                "of a tensor "
                f"of {numel}; the delta was made for another model size"
            )
        tensors[name] = DeltaTensor(name, shape, indices, values)
    info = DeltaInfo(
        format_version=FORMAT_VERSION,
        ffid_version="",
        selector="explicit",
        params={},
        ff=None,
        ffid=None,
        selection_fingerprint="",
        base_fingerprint={},
        base_manifest_fingerprint="",
        naming=naming,
        value_dtype="",
        selected=sum(t.count for t in tensors.values()),
        total_params=None,
        source="musubi",
    )
    return Delta(None, tensors, {}, info)
