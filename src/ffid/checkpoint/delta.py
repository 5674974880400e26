"""The ffid delta file: absolute trained values at explicit flat positions (see docs/delta-format.md).

A delta is a plain ``.safetensors`` file. For every touched tensor ``NAME`` (canonical name) it
holds ``NAME.ffid_index`` (sorted flat indices into ``tensor.reshape(-1)``, the smallest integer
dtype that fits) and ``NAME.ffid_value`` (the trained values, fp32 unless saved otherwise). A
tensor trained whole has only ``NAME.ffid_value``, in the tensor's own shape. String metadata
says what was trained (selector, ff, ffid, fingerprints) and how (``ss_*``, ``modelspec.*``).

Values are absolute, not differences: applying a delta with multiplier 1 writes exactly the
trained values, so ``extract`` followed by ``merge`` reproduces a checkpoint bit for bit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..dtypes import (
    DELTA_VALUE_CODES,
    NUMPY_INT,
    dtype_code,
    index_code,
    is_float_code,
    numpy_storage,
    parse_dtype,
)
from ..errors import ConfigError, MismatchError, ModelFileError
from ..names import canonical_name
from ..selection import Explicit, Selection, TensorPick, Whole
from .namemap import NameResolver, detect_naming
from .stio import (
    SafetensorsFile,
    alignment_order,
    build_header,
    require_finite,
    require_finite_scalar,
    to_f32,
    write_safetensors_stream,
)

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "ffid-delta"
FORMAT_VERSION = "1"
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
    indices: torch.Tensor  # int64, sorted, unique
    values: torch.Tensor  # flat, float (fp32 unless saved otherwise)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        return int(self.indices.numel())

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

    @property
    def base_digest(self) -> str:
        return base_fingerprint_digest(self.base_fingerprint)


def _parse_info(path: Path, meta: Mapping[str, str]) -> DeltaInfo:
    if meta.get(KEY_FORMAT) != FORMAT_NAME:
        raise ModelFileError(
            f"{path} is not an ffid delta (metadata {KEY_FORMAT!r} is {meta.get(KEY_FORMAT)!r}); pass a file "
            "written by save_delta or `ffid extract`, or use `ffid inspect` to see what it is"
        )
    version = meta.get(KEY_FORMAT_VERSION, "")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses ffid delta format version {version!r}, this ffid {__version__} reads version "
            f"{FORMAT_VERSION}; upgrade ffid"
        )
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
    )


class DeltaFile:
    """A delta file opened lazily: header and metadata parsed, tensors read one at a time on demand."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.file = SafetensorsFile(self.path)
        self.metadata = dict(self.file.metadata)
        self.info = _parse_info(self.path, self.metadata)
        names = []
        for key, e in self.file.entries.items():
            if key.endswith(VALUE_SUFFIX):
                names.append(key[: -len(VALUE_SUFFIX)])
                if not is_float_code(e.dtype):
                    raise ModelFileError(
                        f"{self.path}: {key!r} holds {e.dtype}, values must be floats; re-save it"
                    )
            elif key.endswith(INDEX_SUFFIX):
                if e.dtype not in NUMPY_INT:
                    raise ModelFileError(
                        f"{self.path}: {key!r} holds {e.dtype}, indices must be integers; re-save it"
                    )
                if key[: -len(INDEX_SUFFIX)] + VALUE_SUFFIX not in self.file.entries:
                    raise ModelFileError(
                        f"{self.path}: {key!r} has no matching {VALUE_SUFFIX} tensor; re-save it"
                    )
            else:
                raise ModelFileError(f"{self.path}: unexpected tensor {key!r} in a delta file; re-save it")
        self.names = sorted(names)
        missing = [n for n in self.names if n not in self.info.base_fingerprint]
        if missing:
            raise ModelFileError(
                f"{self.path}: tensor {missing[0]!r} has no base fingerprint entry; re-save it"
            )
        for name in self.names:
            self._check_layout(name)

    def _check_layout(self, name: str) -> None:
        """Index and value tensors shaped and typed as the format says (docs/delta-format.md)."""
        ventry = self.file.entries[name + VALUE_SUFFIX]
        ientry = self.file.entries.get(name + INDEX_SUFFIX)
        shape = self.info.base_fingerprint[name].shape
        if self.info.value_dtype and ventry.dtype != self.info.value_dtype:
            why = f"values are {ventry.dtype} but the metadata says {self.info.value_dtype}"
        elif ientry is not None and len(ientry.shape) != 1:
            why = f"its index tensor has shape {list(ientry.shape)}, it must be 1-D"
        elif ientry is not None and len(ventry.shape) != 1:
            why = f"its value tensor has shape {list(ventry.shape)}, it must be 1-D like the index"
        elif ientry is not None and ientry.numel != ventry.numel:
            why = f"it has {ientry.numel} indices but {ventry.numel} values"
        elif ientry is None and ventry.shape != shape:
            why = f"its whole-tensor values have shape {list(ventry.shape)}, the base tensor {list(shape)}"
        else:
            return
        raise ModelFileError(
            f"{self.path}: tensor {name!r} is malformed ({why}); the delta is corrupt, re-save it"
        )

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> DeltaFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info.base_fingerprint[name].shape

    def count(self, name: str) -> int:
        return self.file.entries[name + VALUE_SUFFIX].numel

    def read_indices(self, name: str) -> torch.Tensor:
        """Sorted int64 flat indices of ``name`` (validated against the tensor's size)."""
        import torch

        return torch.from_numpy(self.read_indices_np(name))

    def read_indices_np(self, name: str) -> np.ndarray:
        """:meth:`read_indices` as an int64 numpy array."""
        return self._read_indices(name)

    def read_index_elements(self, name: str, entries: np.ndarray) -> np.ndarray:
        """``read_indices(name)[entries]`` without reading the whole index tensor (a few preads)."""
        ientry = self.file.entries.get(name + INDEX_SUFFIX)
        if ientry is None:
            return entries.astype(np.int64)
        size = np.dtype(NUMPY_INT[ientry.dtype]).itemsize
        fd = self.file.f.fileno()
        base = self.file.data_start + ientry.start
        raw = b"".join(os.pread(fd, size, base + int(j) * size) for j in entries)
        if len(raw) != size * len(entries):
            raise ModelFileError(f"{self.path} is truncated inside {ientry.key!r}; re-save the delta")
        return np.frombuffer(raw, dtype=NUMPY_INT[ientry.dtype]).astype(np.int64)

    def _read_indices(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        numel = 1
        for d in shape:
            numel *= d
        ientry = self.file.entries.get(name + INDEX_SUFFIX)
        ventry = self.file.entries[name + VALUE_SUFFIX]
        if ientry is None:
            if ventry.numel != numel:
                raise ModelFileError(
                    f"{self.path}: {name!r} has no index tensor but {ventry.numel} values for a tensor "
                    f"of {numel}; the file is corrupt, re-save it"
                )
            return np.arange(numel, dtype=np.int64)
        idx = self.file.read_bytes(ientry).view(NUMPY_INT[ientry.dtype]).astype(np.int64)
        if idx.size != ventry.numel:
            raise ModelFileError(
                f"{self.path}: {name!r} has {idx.size} indices but {ventry.numel} values; re-save the delta"
            )
        if idx.size and (idx[0] < 0 or idx[-1] >= numel or not bool((idx[1:] > idx[:-1]).all())):
            raise ModelFileError(
                f"{self.path}: indices of {name!r} are not sorted, unique and within [0, {numel}); "
                "re-save the delta"
            )
        return idx

    def read_values(self, name: str) -> torch.Tensor:
        """The stored values of ``name``, flat, in their stored dtype (refused unless all finite)."""
        values = self.file.read_tensor(self.file.entries[name + VALUE_SUFFIX]).reshape(-1)
        self._check_finite(name, values)
        return values

    def read_values_f32(self, name: str) -> np.ndarray:
        """The stored values of ``name`` as flat numpy fp32 (F32/F16/BF16 values; no torch needed)."""
        entry = self.file.entries[name + VALUE_SUFFIX]
        values = to_f32(self.file.read_bytes(entry).view(numpy_storage(entry.dtype)), entry.dtype)
        self._check_finite(name, values)
        return values

    def _check_finite(self, name: str, values: Any) -> None:
        require_finite(
            values,
            f"delta {self.path} tensor {name!r}",
            "the delta is corrupt or its training diverged: re-train or re-extract it",
        )

    def read(self, name: str) -> DeltaTensor:
        return DeltaTensor(name, self.shape(name), self.read_indices(name), self.read_values(name))


@dataclass
class Delta:
    """A whole delta in memory (see :func:`load_delta`)."""

    path: Path | None
    tensors: dict[str, DeltaTensor]
    metadata: dict[str, str]
    info: DeltaInfo

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def selected(self) -> int:
        return sum(t.count for t in self.tensors.values())

    def values(self) -> dict[str, torch.Tensor]:
        """Canonical name -> fp32 values in index order (what ``handle.load_values`` takes to resume)."""
        import torch

        return {n: t.values.to(torch.float32) for n, t in self.tensors.items()}

    def selection(self, manifest: Any | None = None) -> Selection:
        """The positions of this delta as a :class:`~ffid.selection.Selection` (explicit indices).

        ``manifest`` (a Manifest, module or path) is the model the selection refers to; without
        one, a manifest of just the touched tensors is built from the stored shapes.
        """
        from ..manifest import Manifest, TensorInfo
        from ..models import load_manifest

        if manifest is None:
            manifest = Manifest(
                [TensorInfo(n, t.shape, "F32", n) for n, t in self.tensors.items()], f"delta {self.path}"
            )
        else:
            manifest = load_manifest(manifest)
        picks = {}
        for n, t in self.tensors.items():
            source = Whole(t.numel) if t.whole else Explicit(t.indices)
            picks[n] = TensorPick(n, t.shape, t.count, source)
        params = dict(self.info.params)
        return Selection(self.info.selector or "explicit", params, manifest, picks, self.selected)


def load_delta(path: str | os.PathLike[str]) -> Delta:
    """Read a delta file completely: typed tensors (indices, values), metadata and parsed info."""
    with DeltaFile(path) as df:
        tensors = {n: df.read(n) for n in df.names}
        return Delta(df.path, tensors, df.metadata, df.info)


# -- writing ----------------------------------------------------------------------------------------
def _preset_for(manifest_fingerprint: str) -> str | None:
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
    name: str, shape: tuple[int, ...], count: int, value_code: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The stored tensors ``(key, dtype code, shape)`` of one touched tensor: its flat indices in
    the smallest integer type that fits the tensor (none when trained whole) and its values (in
    the tensor's own shape when trained whole)."""
    if count == math.prod(shape):
        return [(name + VALUE_SUFFIX, value_code, tuple(shape))]
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
) -> dict[str, str]:
    """The string metadata of a delta file titled ``title`` (its file stem): the format's keys,
    the ``ss_*``/``modelspec.*`` keys, then ``metadata`` (reserved keys refused)."""
    meta: dict[str, str] = training_metadata(
        selector=selector,
        params=params,
        architecture=architecture or _preset_for(base_manifest_fingerprint),
        title=title,
    )
    meta.update(
        {
            KEY_FORMAT: FORMAT_NAME,
            KEY_FORMAT_VERSION: FORMAT_VERSION,
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
    for k, v in (metadata or {}).items():
        if k in (KEY_FORMAT, KEY_FORMAT_VERSION, KEY_BASE_FP, KEY_VALUE_DTYPE, KEY_SELECTED):
            raise ConfigError(f"metadata key {k!r} is reserved by the delta format; use another key name")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    return meta


def write_delta(
    path: str | os.PathLike[str],
    tensors: Iterable[DeltaTensor],
    *,
    selector: str,
    params: Mapping[str, Any],
    selection_fingerprint: str,
    base_fingerprint: Mapping[str, TensorFingerprint],
    base_manifest_fingerprint: str,
    naming: str,
    total_params: int | None,
    source: str,
    metadata: Mapping[str, Any] | None = None,
    save_dtype: torch.dtype | str = "fp32",
    architecture: str | None = None,
) -> int:
    """Write a delta file atomically from in-memory tensors; returns the file size in bytes."""
    import torch

    path = Path(path)
    save_dtype = parse_dtype(save_dtype) or torch.float32
    value_code = dtype_code(save_dtype)
    if value_code not in DELTA_VALUE_CODES:
        raise ConfigError(
            f"--save_precision {str(save_dtype).replace('torch.', '')} cannot store delta values; "
            "use fp32, bf16 or fp16"
        )
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    data: dict[str, Any] = {}
    selected = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if t.count == 0:
            continue
        if t.values.numel() != t.count:
            raise ConfigError(f"{t.name!r}: {t.values.numel()} values for {t.count} indices")
        require_finite(
            t.values,
            f"tensor {t.name!r} to be saved in delta {path.name}",
            "a delta must hold finite values: fix the source (training diverged or the tuned file is "
            "corrupt)",
            ConfigError,
        )
        selected += t.count
        for key, code, shape in delta_entries(t.name, t.shape, t.count, value_code):
            if key.endswith(INDEX_SUFFIX):
                data[key] = t.indices.to(torch.int64).numpy().astype(NUMPY_INT[code])
            else:
                data[key] = t.values.reshape(shape).to(save_dtype)
            entries.append((key, code, shape))
    meta = delta_metadata(
        title=path.stem,
        selector=selector,
        params=params,
        selection_fingerprint=selection_fingerprint,
        base_fingerprint=base_fingerprint,
        touched={e[0].rsplit(".ffid_", 1)[0] for e in entries},
        base_manifest_fingerprint=base_manifest_fingerprint,
        naming=naming,
        value_code=value_code,
        selected=selected,
        total_params=total_params,
        source=source,
        metadata=metadata,
        architecture=architecture,
    )
    return write_safetensors_stream(path, entries, data.pop, meta)


def delta_file_size(
    selection: Selection,
    *,
    title: str = "ffid-delta",
    architecture: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    value_code: str = "F32",
    source: str = "train",
) -> int:
    """Bytes of the delta file :func:`save_delta` writes for ``selection`` to
    ``{title}.safetensors`` with this ``architecture`` and extra ``metadata``, exactly, without
    torch: the writer's own entries and metadata, with each values hash replaced by one of the
    same width. Only the timestamp's value differs, never its length."""
    if value_code not in DELTA_VALUE_CODES:
        raise ConfigError(
            f"delta values cannot be stored as {value_code!r}; "
            f"use one of {', '.join(sorted(DELTA_VALUE_CODES))}"
        )
    entries = [
        e for name, pick in selection.items() for e in delta_entries(name, pick.shape, pick.count, value_code)
    ]
    placeholder = "0" * (2 * HASH_BYTES)
    meta = delta_metadata(
        title=title,
        selector=selection.selector,
        params=selection.params,
        selection_fingerprint=selection.fingerprint,
        base_fingerprint={n: TensorFingerprint(tuple(p.shape), placeholder) for n, p in selection.items()},
        touched=list(selection),
        base_manifest_fingerprint=selection.manifest.fingerprint,
        naming=detect_naming(selection.manifest.names),
        value_code=value_code,
        selected=selection.selected,
        total_params=selection.total_params,
        source=source,
        metadata=metadata,
        architecture=architecture,
    )
    head, laid_out = build_header(alignment_order(entries), meta)
    return len(head) + (laid_out[-1].end if laid_out else 0)


def save_delta(
    handle: Any,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    save_dtype: torch.dtype | str = "fp32",
    architecture: str | None = None,
) -> int:
    """Save what an attached engine handle trained as a delta file; returns the file size.

    ``handle`` follows the engine contract (``selection``, ``trained_values()``,
    ``base_values()``). ``metadata`` adds (or overrides) string keys such as ``ss_learning_rate``;
    ``save_dtype`` is the value precision (fp32 by default, like other trainers' adapters).
    """
    sel: Selection = handle.selection
    trained = handle.trained_values()
    base = handle.base_values()
    tensors = []
    fps: dict[str, TensorFingerprint] = {}
    for name in sel:
        pick = sel[name]
        idx = sel.indices(name)
        if name not in trained or name not in base:
            raise ConfigError(
                f"the handle has no trained/base values for {name!r}; attach again before saving"
            )
        vals, bvals = trained[name].reshape(-1), base[name].reshape(-1)
        if vals.numel() != idx.numel() or bvals.numel() != idx.numel():
            raise ConfigError(
                f"{name!r}: {vals.numel()} trained / {bvals.numel()} base values for {idx.numel()} "
                "selected positions"
            )
        tensors.append(DeltaTensor(name, tuple(pick.shape), idx, vals.detach().cpu()))
        fps[name] = TensorFingerprint(tuple(pick.shape), values_hash(bvals[sample_positions(idx.numel())]))
    params = dict(sel.params)
    model = getattr(handle, "model", None)
    arch = (
        architecture
        or _preset_for(sel.manifest.fingerprint)
        or (type(model).__name__ if model is not None else None)
    )
    return write_delta(
        path,
        tensors,
        selector=sel.selector,
        params=params,
        selection_fingerprint=sel.fingerprint,
        base_fingerprint=fps,
        base_manifest_fingerprint=sel.manifest.fingerprint,
        naming=detect_naming(sel.manifest.names),
        total_params=sel.total_params,
        source="train",
        metadata=metadata,
        save_dtype=save_dtype,
        architecture=arch,
    )


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
        delta = load_delta(delta)
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
