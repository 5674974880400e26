"""Reading delta files: :class:`DeltaFile` (lazy, one tensor at a time) and :func:`load_delta`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import (
    NUMPY_INT,
    is_float_code,
    numpy_storage,
)
from ..errors import ConfigError, ModelFileError
from ..selection import Explicit, Selection, TensorPick, Whole
from .delta_format import INDEX_SUFFIX, VALUE_SUFFIX, DeltaInfo, DeltaTensor, parse_info
from .delta_text import TextLayout, is_text_key, parse_text
from .stio import (
    SafetensorsFile,
    require_finite,
    to_f32,
)

if TYPE_CHECKING:
    import torch


class DeltaFile:
    """A delta file opened lazily: header and metadata parsed, tensors read one at a time on demand."""

    def __init__(self, path: str | os.PathLike[str], base: Any | None = None):
        self.path = Path(path)
        self._selection: Selection | None = None  # format 2: the positions, once rebuilt (bind)
        self.file = SafetensorsFile(self.path)
        self.metadata = dict(self.file.metadata)
        self.info = parse_info(self.path, self.metadata)
        # the stored text encodings (ffid.text.*), checked from the header; read on demand
        self.text: TextLayout | None = parse_text(self.path, self.file.entries, self.metadata)
        names = []
        for key, e in self.file.entries.items():
            if is_text_key(key):
                continue
            if key.endswith(VALUE_SUFFIX):
                names.append(key[: -len(VALUE_SUFFIX)])
                if not is_float_code(e.dtype):
                    raise ModelFileError(
                        f"{self.path}: {key!r} holds {e.dtype}, values must be floats; re-save it"
                    )
            elif key.endswith(INDEX_SUFFIX) and not self.info.implicit:
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
        if self.info.selection_record is not None:
            try:
                self._check_counts()
                if base is not None:
                    self.bind(base)
            except BaseException:
                self.close()  # refused: the caller never gets the object to close it
                raise

    def _check_counts(self) -> None:
        """Format 2: the recorded counts name exactly the stored tensors, match their value counts
        and add up to ``ffid.selected`` (else the header or the value block is damaged)."""
        record = self.info.selection_record
        assert record is not None
        why = None
        if set(record.counts) != set(self.names):
            odd = sorted(set(record.counts) ^ set(self.names))[0]
            if odd in record.counts:
                why = f"its selection records tensor {odd!r}, which the file does not store"
            else:
                why = f"the file stores tensor {odd!r}, which its selection does not record"
        elif record.selected != self.info.selected:
            total = self.info.selected
            why = f"the per-tensor counts add up to {record.selected:,}, not ffid.selected = {total:,}"
        else:
            for n in self.names:
                if self.count(n) != record.counts[n]:
                    why = f"tensor {n!r} stores {self.count(n):,} values, its selection records "
                    why += f"{record.counts[n]:,}"
                    break
        if why:
            raise ModelFileError(f"{self.path} is a damaged implicit-index delta ({why}); re-save it")

    @property
    def implicit(self) -> bool:
        """True for format 2: the positions are rebuilt from the base (:meth:`bind`), not stored."""
        return self.info.implicit

    def bind(self, base: Any) -> Selection | None:
        """Rebuild the positions of a format 2 delta from ``base`` (a Checkpoint, module, manifest,
        state dict or path) and check them; nothing to do for format 1. Returns the selection."""
        from .implicit import base_manifest, rebuild

        record = self.info.selection_record
        if record is None:
            return None
        if self._selection is None:
            shapes = {n: self.shape(n) for n in self.names}
            manifest = base_manifest(base, self.info.naming)
            self._selection = rebuild(self.path, record, shapes, manifest)
        return self._selection

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
        elif ientry is None and ventry.shape != shape and not (self.info.implicit and len(ventry.shape) == 1):
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
        if self.implicit:
            return self._read_indices(name)[entries]
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
        if self.implicit:
            if self._selection is None:
                raise ConfigError(
                    f"{self.path} stores no positions (an implicit-index delta, format 2): they are rebuilt "
                    "from the base model, so give the base (DeltaFile(path, base=...), load_delta(path, "
                    "base=model)) or convert it with `ffid convert --indices explicit --base BASE`"
                )
            return self._selection[name].indices_np()
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

    # -- stored text encodings (see .delta_text) ---------------------------------------------------
    @property
    def text_count(self) -> int:
        """How many prompts' text encodings the file stores (0 for older deltas)."""
        return self.text.count if self.text is not None else 0

    @property
    def text_width(self) -> int | None:
        """The width of the stored encodings (the text encoder's output size), None without any."""
        return self.text.width if self.text is not None else None

    @property
    def text_prompts(self) -> list[str]:
        """The captions whose encodings the file stores, in stored order."""
        return list(self.text.prompts) if self.text is not None else []

    def read_text(self, prompt: str) -> torch.Tensor:
        """The stored ``[tokens, width]`` encoding of ``prompt``, in its stored dtype (finite)."""
        if self.text is None or prompt not in self.text.prompts:
            raise ConfigError(f"{self.path} stores no text encoding of {prompt[:40]!r}")
        key = self.text.keys[self.text.prompts.index(prompt)]
        t = self.file.read_tensor(key)
        require_finite(t, f"delta {self.path} text encoding {key!r}", "the delta is corrupt: re-save it")
        return t

    def text_encodings(self) -> dict[str, torch.Tensor]:
        """Every stored encoding, caption -> ``[tokens, width]`` tensor, in stored order (read now)."""
        return {p: self.read_text(p) for p in self.text_prompts}


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


def load_delta(path: str | os.PathLike[str], base: Any | None = None) -> Delta:
    """Read a delta file completely: typed tensors (indices, values), metadata and parsed info.

    ``base`` (the model, its checkpoint, manifest or state dict) is needed only by an
    implicit-index delta (format 2), whose positions are rebuilt from the base's shapes. Stored
    text encodings are not read here (only runs that protect them need them:
    :meth:`DeltaFile.text_encodings`).
    """
    with DeltaFile(path, base=base) as df:
        tensors = {n: df.read(n) for n in df.names}
        return Delta(df.path, tensors, df.metadata, df.info)
