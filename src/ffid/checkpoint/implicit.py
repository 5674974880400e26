"""Delta format version 2, "implicit indices": the positions are rebuilt, not stored.

A selection is a pure function of the model's names and shapes, the selector with its options,
``ff``, ``ffid``, include/exclude and the block pattern. A version 2 delta therefore stores only
the values, in selection order, and records that recipe in ``ffid.selection`` together with the
layout version of the selector, the manifest fingerprint of the model it was planned on, the
count of every tensor and the selection fingerprint. A reader plans the same selection on the
base it is given and refuses, in one line, anything that does not check out: another model,
another layout version, or a damaged file (see docs/delta-format.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import ConfigError, FfidError, MismatchError, ModelFileError
from ..manifest import Manifest, TensorInfo
from ..names import canonical_name
from ..selection import Selection
from .namemap import OTHER, detect_naming, map_name

FORMAT_VERSION_EXPLICIT = "1"
FORMAT_VERSION_IMPLICIT = "2"
KEY_SELECTION = "ffid.selection"
INDICES_CHOICES = ("explicit", "implicit")


@dataclass(frozen=True)
class SelectionRecord:
    """What ``ffid.selection`` holds: enough to plan the delta's selection again."""

    selector: str
    options: dict[str, int]
    ff: float
    ffid: int
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    block_pattern: str | None
    layout: str  # "spread/1": selector and layout version
    manifest: str  # Manifest.fingerprint of the model the selection was planned on
    fingerprint: str  # Selection.fingerprint
    counts: dict[str, int]  # canonical name (in the delta's naming) -> positions

    def to_json(self) -> str:
        return json.dumps(
            {
                "selector": self.selector,
                "options": self.options,
                "ff": self.ff,
                "ffid": self.ffid,
                "include": list(self.include),
                "exclude": list(self.exclude),
                "block_pattern": self.block_pattern,
                "layout": self.layout,
                "manifest": self.manifest,
                "fingerprint": self.fingerprint,
                "counts": dict(sorted(self.counts.items())),
            },
            separators=(",", ":"),
        )

    @property
    def selected(self) -> int:
        return sum(self.counts.values())


def check_indices(indices: str) -> str:
    """``explicit`` or ``implicit``, else a one-line error naming the value."""
    if indices not in INDICES_CHOICES:
        raise ConfigError(f"--indices {indices!r} is not a delta layout; choose explicit or implicit")
    return indices


def record_of(sel: Selection) -> SelectionRecord:
    """The record that rebuilds ``sel`` (refused for selections no selector can plan again)."""
    from ..select import SELECTORS, SelectionSettings

    if sel.selector not in SELECTORS:
        raise ConfigError(
            f"selection {sel.selector!r} has explicit positions that no selector can plan again (an "
            "unrestricted extract or a hand-made delta); write it with --indices explicit, or extract "
            "with --ff/--ffid"
        )
    settings = SelectionSettings.from_selection(sel)
    return SelectionRecord(
        selector=settings.selector,
        options=settings.resolved_options,
        ff=settings.ff,
        ffid=settings.ffid,
        include=settings.include,
        exclude=settings.exclude,
        block_pattern=settings.block_pattern,
        layout=settings.selector_object.layout,
        manifest=sel.manifest.fingerprint,
        fingerprint=sel.fingerprint,
        counts={n: p.count for n, p in sel.items()},
    )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def parse_record(path: Path, raw: str | None) -> SelectionRecord:
    """``ffid.selection`` of a version 2 delta, type-checked (a damaged header is one line)."""

    def damaged(why: str) -> ModelFileError:
        return ModelFileError(
            f"{path} is a damaged implicit-index delta ({KEY_SELECTION} {why}); re-save or re-convert it"
        )

    if not raw:
        raise damaged("is missing")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise damaged("is not JSON") from None
    if not isinstance(obj, dict):
        raise damaged("is not a JSON object")
    counts, options = obj.get("counts"), obj.get("options")
    ok = (
        isinstance(obj.get("selector"), str)
        and isinstance(options, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in options.items())
        and isinstance(obj.get("ff"), (int, float))
        and type(obj.get("ffid")) is int
        and _strings(obj.get("include"))
        and _strings(obj.get("exclude"))
        and (obj.get("block_pattern") is None or isinstance(obj.get("block_pattern"), str))
        and all(isinstance(obj.get(k), str) for k in ("layout", "manifest", "fingerprint"))
        and isinstance(counts, dict)
        and all(isinstance(k, str) and type(v) is int and v > 0 for k, v in counts.items())
    )
    if not ok:
        raise damaged("has a missing or mistyped field")
    return SelectionRecord(
        selector=obj["selector"],
        options=dict(options),
        ff=float(obj["ff"]),
        ffid=obj["ffid"],
        include=tuple(obj["include"]),
        exclude=tuple(obj["exclude"]),
        block_pattern=obj["block_pattern"],
        layout=obj["layout"],
        manifest=obj["manifest"],
        fingerprint=obj["fingerprint"],
        counts=dict(counts),
    )


def base_manifest(base: Any, naming: str) -> Manifest:
    """The manifest of ``base`` with names in the delta's ``naming`` (Wan <-> diffusers mapped).

    ``base`` is a :class:`Manifest`, an ``nn.Module``, a :class:`~ffid.checkpoint.files.Checkpoint`,
    a mapping ``name -> tensor`` (a state dict) or anything :func:`ffid.models.load_manifest` takes.
    """
    from ..dtypes import FLOAT_DTYPES, dtype_code
    from ..models import load_manifest
    from .files import Checkpoint

    if isinstance(base, Checkpoint):
        infos = [
            TensorInfo(n, tuple(loc.entry.shape), loc.entry.dtype, loc.entry.key)
            for n, loc in base.tensors.items()
            if loc.entry.dtype in FLOAT_DTYPES and loc.entry.numel > 0
        ]
        manifest = Manifest(infos, str(base.path))
    elif isinstance(base, Mapping):
        infos = []
        for key, t in base.items():
            code = dtype_code(t.dtype) if hasattr(t, "dtype") else "F32"
            if code in FLOAT_DTYPES and math.prod(t.shape) > 0:
                infos.append(TensorInfo(canonical_name(key), tuple(t.shape), code, key))
        manifest = Manifest(infos, "state dict")
    else:
        manifest = load_manifest(base)
    have = detect_naming(manifest.names)
    if OTHER in (have, naming) or have == naming:
        return manifest
    mapped = [
        TensorInfo(map_name(t.name, have, naming), t.shape, t.dtype, t.source_name, t.file) for t in manifest
    ]
    return Manifest(mapped, manifest.source, manifest.block_pattern, dict(manifest.metadata))


def value_code_of(manifest: Manifest, names: Any) -> str:
    """The delta value dtype that matches the model: the dtype of the touched tensors when they
    share one that a delta can hold, else F32 (exact for every float model)."""
    from ..dtypes import DELTA_VALUE_CODES

    codes = {manifest[n].dtype for n in names if n in manifest}
    if len(codes) == 1 and next(iter(codes)) in DELTA_VALUE_CODES:
        return next(iter(codes))
    return "F32"


def rebuild(
    path: Path, record: SelectionRecord, shapes: Mapping[str, tuple[int, ...]], manifest: Manifest
) -> Selection:
    """Plan ``record`` again on ``manifest`` (already in the delta's naming) and check it.

    ``shapes`` are the base shapes the delta records per tensor. Every refusal is one line that
    says which: another model, another layout version, or a damaged file.
    """
    from ..select import SELECTORS, SelectionSettings

    name = path.name
    selector_name = record.layout.partition("/")[0]
    selector = SELECTORS.get(selector_name)
    if selector is None or selector.layout != record.layout or selector_name != record.selector:
        have = selector.layout if selector is not None else "no such selector"
        raise ModelFileError(
            f"delta {name} was planned with selection layout {record.layout!r}, which ffid {__version__} "
            f"cannot rebuild (it has {have}); use the ffid that wrote it, or convert it there with "
            f"`ffid convert {name} --indices explicit`"
        )
    for tensor, shape in sorted(shapes.items()):
        if tensor not in manifest:
            raise MismatchError(
                f"delta {name} changes tensor {tensor!r}, which the base {manifest.source} lacks (first "
                "mismatching tensor); the delta was made for another model"
            )
        if tuple(manifest[tensor].shape) != tuple(shape):
            raise MismatchError(
                f"tensor {tensor!r} is {list(manifest[tensor].shape)} in the base {manifest.source} but "
                f"{list(shape)} in delta {name} (first mismatching tensor); the delta was made for another "
                "model size"
            )
    if manifest.fingerprint != record.manifest:
        raise MismatchError(
            f"delta {name} was made for another model (planned on manifest {record.manifest}, the base "
            f"{manifest.source} has {manifest.fingerprint}: other tensor names or shapes); its positions "
            "are rebuilt from the base, so use the model it was trained on"
        )
    try:
        settings = SelectionSettings(
            ff=record.ff,
            ffid=record.ffid,
            selector=record.selector,
            options=record.options,
            include=record.include,
            exclude=record.exclude,
            block_pattern=record.block_pattern,
        )
        sel = settings.plan(manifest)
    except FfidError as exc:
        why = " ".join(str(exc).split())[:160]
        raise ModelFileError(
            f"delta {name} records a selection that cannot be planned again ({why}); the file is damaged: "
            "re-save it"
        ) from None
    got = {n: p.count for n, p in sel.items()}
    if got != record.counts:
        first = next(n for n in sorted(set(got) | set(record.counts)) if got.get(n) != record.counts.get(n))
        raise ModelFileError(
            f"delta {name}: layout {record.layout} plans {got.get(first, 0):,} positions in tensor "
            f"{first!r} where the file records {record.counts.get(first, 0):,}; it was written by another "
            "planner version or is damaged: re-save it, or convert it with the ffid that wrote it"
        )
    if sel.fingerprint != record.fingerprint:
        raise ModelFileError(
            f"delta {name}: the rebuilt selection has fingerprint {sel.fingerprint}, the file records "
            f"{record.fingerprint}; it was written by another planner version or is damaged: re-save it, "
            "or convert it with the ffid that wrote it"
        )
    return sel
