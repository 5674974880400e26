"""The ffid delta format: its keys, the base fingerprint, the parsed header (docs/delta-format.md).

What every reader and writer of a delta agrees on lives here; reading is in :mod:`.delta_read`,
writing in :mod:`.delta_write`, applying to a module in :mod:`.delta_apply`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..dtypes import (
    index_code,
)
from ..errors import ConfigError, ModelFileError
from .delta_text import KEY_TEXT_PROMPTS
from .implicit import FORMAT_VERSION_IMPLICIT, KEY_SELECTION, SelectionRecord, parse_record

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "ffid-delta"
FORMAT_VERSION = "1"  # explicit indices; "2" (implicit indices) is described in .implicit
FORMAT_VERSIONS = (FORMAT_VERSION, FORMAT_VERSION_IMPLICIT)
INDEX_SUFFIX = ".ffid_index"
VALUE_SUFFIX = ".ffid_value"
# Value codes a delta may store (fp8 cannot hold trained values faithfully and most readers cannot
# decode it).
# Bytes of every values hash (16 hex digits in the base fingerprint).
HASH_BYTES = 8
# Base positions hashed per tensor for the base fingerprint: enough to tell two bases apart,
# few enough that checking a 1,095-tensor model costs milliseconds.
FINGERPRINT_SAMPLES = 32

KEY_FORMAT = "ffid.format"
KEY_FORMAT_VERSION = "ffid.format_version"
KEY_VERSION = "ffid.version"
KEY_SELECTOR = "ffid.selector"
KEY_PARAMS = "ffid.params"
KEY_FF = "ffid.ff"
KEY_FFID = "ffid.ffid"
KEY_SELECTION_FP = "ffid.selection_fingerprint"
KEY_BASE_FP = "ffid.base_fingerprint"
KEY_BASE_MANIFEST_FP = "ffid.base_manifest_fingerprint"
KEY_NAMING = "ffid.naming"
KEY_VALUE_DTYPE = "ffid.value_dtype"
KEY_SELECTED = "ffid.selected"
KEY_TOTAL = "ffid.total_params"
KEY_SOURCE = "ffid.source"
# Wan 2.2 two-expert runs (musubi --dit_high_noise): which expert's checkpoint a delta belongs to
KEY_EXPERT = "ffid.expert"
# Optional, written by training: what the run taught, so later runs can protect it (ffid.preserve).
KEY_PROMPTS = "ffid.prompts"  # JSON list of the prompts/captions trained
KEY_TRIGGER_WORDS = "ffid.trigger_words"  # JSON list of the run's trigger words


# -- base fingerprint -------------------------------------------------------------------------------
def sample_positions_np(count: int, samples: int = FINGERPRINT_SAMPLES) -> np.ndarray:
    """Which entries (0..count-1) of a tensor's index list are hashed: evenly spaced, ends included."""
    if count <= samples:
        return np.arange(count, dtype=np.int64)
    return np.arange(samples, dtype=np.int64) * (count - 1) // (samples - 1)


def sample_positions(count: int, samples: int = FINGERPRINT_SAMPLES) -> torch.Tensor:
    """:func:`sample_positions_np` as a torch tensor."""
    import torch

    return torch.from_numpy(sample_positions_np(count, samples))


def values_hash(values: Any) -> str:
    """16 hex digits hashing values (torch or numpy) as little-endian fp32 (bf16 and its upcast agree)."""
    if isinstance(values, np.ndarray):
        data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    else:
        import torch

        data = values.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=HASH_BYTES).hexdigest()


@dataclass(frozen=True)
class TensorFingerprint:
    """Shape of one base tensor and the hash of its base values at the sampled selected positions."""

    shape: tuple[int, ...]
    hash: str

    def to_json(self) -> list[Any]:
        return [list(self.shape), self.hash]

    @staticmethod
    def from_json(obj: Any) -> TensorFingerprint:
        shape, digest = obj
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"fingerprint shape {shape!r} is not a list of non-negative integers")
        if not isinstance(digest, str):
            raise ValueError(f"fingerprint hash {digest!r} is not a string")
        return TensorFingerprint(tuple(shape), digest)


def base_fingerprint_digest(fps: Mapping[str, TensorFingerprint]) -> str:
    """One 16-hex summary of a whole base fingerprint (for display)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(fps):
        fp = fps[name]
        h.update(f"{name}:{','.join(map(str, fp.shape))}:{fp.hash};".encode())
    return h.hexdigest()


# -- the in-memory form ----------------------------------------------------------------------------
@dataclass
class DeltaTensor:
    """The trained values of one tensor: ``values[i]`` belongs at flat position ``indices[i]``."""

    name: str
    shape: tuple[int, ...]
    # int64, sorted, unique; None only on the way into an implicit-index file, which rebuilds them
    indices: torch.Tensor | None
    values: torch.Tensor  # flat, float (fp32 unless saved otherwise)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return int(self.values.numel() if self.indices is None else self.indices.numel())

    @property
    def whole(self) -> bool:
        return self.count == self.numel


@dataclass
class DeltaInfo:
    """What a delta was made from, parsed from its metadata."""

    format_version: str
    ffid_version: str
    selector: str
    params: dict[str, Any]
    ff: float | None
    ffid: int | None
    selection_fingerprint: str
    base_fingerprint: dict[str, TensorFingerprint]
    base_manifest_fingerprint: str
    naming: str
    value_dtype: str
    selected: int
    total_params: int | None
    source: str
    # Format 2 only: what rebuilds the positions (None for format 1, which stores them).
    selection_record: SelectionRecord | None = None

    @property
    def implicit(self) -> bool:
        """True for a format 2 delta: values only, positions rebuilt from the base's shapes."""
        return self.selection_record is not None

    @property
    def base_digest(self) -> str:
        return base_fingerprint_digest(self.base_fingerprint)


def parse_info(path: Path, meta: Mapping[str, str]) -> DeltaInfo:
    if meta.get(KEY_FORMAT) != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is not an ffid delta (metadata {KEY_FORMAT!r} is {meta.get(KEY_FORMAT)!r}); pass a file "
            "written by save_delta or `ffid extract`, or use `ffid inspect` to see what it is"
        )
    version = meta.get(KEY_FORMAT_VERSION, "")
    if version not in FORMAT_VERSIONS:
        raise ModelFileError(
            f"{path} uses ffid delta format version {version!r}, this ffid {__version__} reads versions "
            f"{' and '.join(FORMAT_VERSIONS)}; upgrade ffid"
        )
    record = parse_record(path, meta.get(KEY_SELECTION)) if version == FORMAT_VERSION_IMPLICIT else None
    try:
        params = json.loads(meta.get(KEY_PARAMS) or "{}")
        fp_json = json.loads(meta.get(KEY_BASE_FP) or "{}")
        if not isinstance(params, dict) or not isinstance(fp_json, dict):
            raise TypeError(f"{KEY_PARAMS} and {KEY_BASE_FP} must be JSON objects")
        base_fp = {n: TensorFingerprint.from_json(v) for n, v in fp_json.items()}
        ff = float(meta[KEY_FF]) if meta.get(KEY_FF) else None
        ffid = int(meta[KEY_FFID]) if meta.get(KEY_FFID) else None
        total = int(meta[KEY_TOTAL]) if meta.get(KEY_TOTAL) else None
        selected = int(meta.get(KEY_SELECTED) or 0)
    except (ValueError, TypeError, RecursionError, json.JSONDecodeError) as exc:
        why = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ModelFileError(f"{path} has corrupt ffid metadata ({why}); re-save the delta") from None
    return DeltaInfo(
        format_version=version,
        ffid_version=meta.get(KEY_VERSION, ""),
        selector=meta.get(KEY_SELECTOR, ""),
        params=params,
        ff=ff,
        ffid=ffid,
        selection_fingerprint=meta.get(KEY_SELECTION_FP, ""),
        base_fingerprint=base_fp,
        base_manifest_fingerprint=meta.get(KEY_BASE_MANIFEST_FP, ""),
        naming=meta.get(KEY_NAMING, "other"),
        value_dtype=meta.get(KEY_VALUE_DTYPE, ""),
        selected=selected,
        total_params=total,
        source=meta.get(KEY_SOURCE, ""),
        selection_record=record,
    )


# -- writing ----------------------------------------------------------------------------------------
def preset_for(manifest_fingerprint: str) -> str | None:
    try:
        from ..presets import PRESETS, preset_manifest
    except ImportError:  # pragma: no cover
        return None
    for name in PRESETS:
        try:
            if preset_manifest(name).fingerprint == manifest_fingerprint:
                return name
        except Exception:  # a broken preset must not stop a save
            continue
    return None


def training_metadata(
    *,
    selector: str,
    params: Mapping[str, Any],
    architecture: str | None,
    title: str,
    suffix: str = "ffid-delta",
) -> dict[str, str]:
    """Default ``ss_*`` / ``modelspec.*`` keys that kohya-style tools and model browsers read."""
    args = {"selector": selector, **{k: v for k, v in params.items() if v is not None}}
    return {
        "ss_network_module": "ffid",
        "ss_network_args": json.dumps(args, sort_keys=True, default=str),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or 'unknown'}/{suffix}",
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }


def delta_entries(
    name: str, shape: tuple[int, ...], count: int, value_code: str, implicit: bool = False
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The stored tensors ``(key, dtype code, shape)`` of one touched tensor: its flat indices in
    the smallest integer type that fits the tensor (none when trained whole, or ``implicit``: format
    2 rebuilds them) and its values (in the tensor's own shape when trained whole)."""
    if count == math.prod(shape):
        return [(name + VALUE_SUFFIX, value_code, tuple(shape))]
    if implicit:
        return [(name + VALUE_SUFFIX, value_code, (count,))]
    return [
        (name + INDEX_SUFFIX, index_code(math.prod(shape)), (count,)),
        (name + VALUE_SUFFIX, value_code, (count,)),
    ]


def delta_metadata(
    *,
    title: str,
    selector: str,
    params: Mapping[str, Any],
    selection_fingerprint: str,
    base_fingerprint: Mapping[str, TensorFingerprint],
    touched: Iterable[str],
    base_manifest_fingerprint: str,
    naming: str,
    value_code: str,
    selected: int,
    total_params: int | None,
    source: str,
    metadata: Mapping[str, Any] | None,
    architecture: str | None,
    record: SelectionRecord | None = None,
) -> dict[str, str]:
    """The string metadata of a delta file titled ``title`` (its file stem): the format's keys,
    the ``ss_*``/``modelspec.*`` keys, then ``metadata`` (reserved keys refused)."""
    meta: dict[str, str] = training_metadata(
        selector=selector,
        params=params,
        architecture=architecture or preset_for(base_manifest_fingerprint),
        title=title,
    )
    meta.update(
        {
            KEY_FORMAT: FORMAT_NAME,
            KEY_FORMAT_VERSION: FORMAT_VERSION if record is None else FORMAT_VERSION_IMPLICIT,
            KEY_VERSION: __version__,
            KEY_SELECTOR: selector,
            KEY_PARAMS: json.dumps(dict(params), sort_keys=True, default=str),
            KEY_FF: "" if params.get("ff") is None else repr(float(params["ff"])),
            KEY_FFID: "" if params.get("ffid") is None else str(int(params["ffid"])),
            KEY_SELECTION_FP: selection_fingerprint,
            KEY_BASE_FP: json.dumps(
                {n: base_fingerprint[n].to_json() for n in sorted(touched)}, separators=(",", ":")
            ),
            KEY_BASE_MANIFEST_FP: base_manifest_fingerprint,
            KEY_NAMING: naming,
            KEY_VALUE_DTYPE: value_code,
            KEY_SELECTED: str(selected),
            KEY_TOTAL: "" if total_params is None else str(int(total_params)),
            KEY_SOURCE: source,
        }
    )
    if record is not None:
        meta[KEY_SELECTION] = record.to_json()
    for k, v in (metadata or {}).items():
        reserved = (KEY_FORMAT, KEY_FORMAT_VERSION, KEY_BASE_FP, KEY_VALUE_DTYPE, KEY_SELECTED, KEY_SELECTION)
        if k in reserved or k == KEY_TEXT_PROMPTS:  # the text captions go with their tensors
            raise ConfigError(f"metadata key {k!r} is reserved by the delta format; use another key name")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    return meta


def expert_hint(metadata: Mapping[str, str]) -> str:
    """For a mismatch message: which Wan 2.2 expert a delta was trained on, when it says so."""
    expert = str(metadata.get(KEY_EXPERT, ""))
    if expert not in ("high_noise", "low_noise"):
        return ""
    other = "low_noise" if expert == "high_noise" else "high_noise"
    return (
        f" (this delta belongs to Wan 2.2's {expert} expert; its {other} twin goes into the other "
        "expert's checkpoint)"
    )
