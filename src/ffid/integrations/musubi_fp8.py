"""musubi-tuner's ``--fp8_scaled`` on the ffid network: where the trained elements start, and how
``--base_weights`` reach scaled fp8 weights.

musubi loads the DiT file (bf16/fp16) and quantizes each Linear weight of its blocks to fp8 with
a scale (see :mod:`ffid.engine.scaled`). The engine trains those weights through musubi's own
product, so every element ffid does not train is what musubi computes. The trained elements
start from the *file's* values (read here, only those positions, one tensor at a time), not from
their fp8 copies: a delta is then exact against the file ``ffid merge`` writes it into, and an
untrained element of it equals the file bit for bit.

An earlier character given with ``--base_weights`` is written into the fp8 weights with their
own scales (rounded to fp8 like the rest of the base this run sees); its delta file is not
changed, and the new id's positions never meet it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..checkpoint.delta import Delta, apply_delta, blend
from ..checkpoint.files import Checkpoint
from ..checkpoint.namemap import NameResolver
from ..engine.scaled import read_at, scale_of, write_at
from ..errors import ConfigError, MismatchError, ModelFileError
from ..names import canonical_name

logger = logging.getLogger(__name__)


def file_values(path: str, positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The values of the checkpoint at ``path`` at flat ``positions`` per tensor (fp32 CPU).

    ``path`` is musubi's ``--dit`` (one file, or an index with shards). Refused in one line when
    a tensor is missing or has another size (the file is not the model musubi loaded).
    """
    out: dict[str, torch.Tensor] = {}
    with Checkpoint(path) as ck:
        resolver = NameResolver(ck.tensors, "other")
        for name, idx in positions.items():
            key = resolver.resolve(name)
            if key is None:
                raise ModelFileError(
                    f"{path} has no tensor {name!r}, which musubi's --fp8_scaled DiT has; ffid reads the "
                    "starting values of the trained elements from --dit: give the whole checkpoint (a "
                    "split --dit is read only through an .index.json)"
                )
            located = ck.tensors[key]
            t = located.file.read_tensor(located.entry)
            if idx.numel() and int(idx.max()) >= t.numel():
                raise MismatchError(
                    f"{path}: tensor {name!r} has {t.numel()} elements, fewer than the model's"
                )
            out[name] = t.reshape(-1)[idx].to(torch.float32)
            del t
    return out


def narrowed_names(handle: Any) -> list[str]:
    """Trained tensors the DiT holds as fp8 copies of the file (``--fp8_scaled`` weights, and every
    tensor under plain ``--fp8_base``, which casts the whole DiT): their elements start from the
    file's values instead."""
    scaled = set(handle.scaled_names())
    return [n for n in handle.proxy_keys() if n in scaled or handle.model_dtype(n).itemsize == 1]


def start_from_file(handle: Any, dit: str | None) -> int:
    """Make the trained elements of fp8-held tensors start from the ``--dit`` file's values.

    Returns how many tensors were read (0 when the DiT holds no trained tensor in fp8).
    """
    names = narrowed_names(handle)
    if not names:
        return 0
    if not dit:
        raise ConfigError(
            "--fp8_base/--fp8_scaled: ffid reads the starting values of the trained elements from --dit, "
            "but musubi gave no --dit path; pass --dit"
        )
    sel = handle.selection
    values = file_values(dit, {name: sel.indices(name) for name in names})
    handle.set_base_values(values)
    logger.info(
        "ffid: fp8 DiT: %d trained tensors start from %s's values (not their fp8 copies)", len(values), dit
    )
    return len(values)


def merge_scaled(unet: nn.Module, delta: Delta, multiplier: float) -> tuple[int, int]:
    """Write ``delta`` into ``unet`` where some of its tensors are fp8 weights.

    Scaled weights take ``quantize(base + m * (trained - base))`` with their own scale, plain fp8
    weights (``--fp8_base``) the same rounded to fp8; the others go through
    :func:`~ffid.checkpoint.delta.apply_delta`. Returns ``(fp8 tensors, others)``.
    """
    owners: dict[str, nn.Module] = {}  # fp8 weights: scaled ones and --fp8_base casts
    for path, module in unet.named_modules():
        w = module._parameters.get("weight")
        if w is not None and w.is_floating_point() and w.element_size() == 1:
            owners[canonical_name(f"{path}.weight" if path else "weight")] = module
    if not owners:
        apply_delta(unet, delta, multiplier, verify=False)
        return 0, len(delta)
    resolver = NameResolver(owners, delta.info.naming)
    plain = {}
    done = 0
    with torch.no_grad():
        for name, dt in delta.tensors.items():
            target = resolver.resolve(name)
            if target is None:
                plain[name] = dt
                continue
            module = owners[target]
            weight = module._parameters["weight"]
            scale = scale_of(module)  # None: plain --fp8_base, rounded to fp8
            idx = dt.indices.to(weight.device)
            new = blend(read_at(weight, scale, idx), dt.values.to(weight.device), multiplier)
            write_at(weight, scale, idx, new)
            done += 1
    if plain:
        rest = Delta(delta.path, plain, delta.metadata, delta.info)
        apply_delta(unet, rest, multiplier, verify=False)
    return done, len(plain)
