"""Writing delta files: :func:`write_delta`, :func:`save_delta` and :func:`delta_file_size`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import (
    DELTA_VALUE_CODES,
    NUMPY_INT,
    dtype_code,
    parse_dtype,
    torch_dtypes,
)
from ..errors import ConfigError
from ..selection import Selection
from .delta_format import (
    HASH_BYTES,
    INDEX_SUFFIX,
    DeltaTensor,
    TensorFingerprint,
    delta_entries,
    delta_metadata,
    preset_for,
    sample_positions,
    values_hash,
)
from .delta_text import text_entries
from .implicit import check_indices, record_of, value_code_of
from .namemap import detect_naming
from .stio import (
    alignment_order,
    build_header,
    require_finite,
    write_safetensors_stream,
)

if TYPE_CHECKING:
    import torch


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
    save_dtype: torch.dtype | str | None = None,
    architecture: str | None = None,
    indices: str = "explicit",
    selection: Selection | None = None,
    text: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Write a delta file atomically from in-memory tensors; returns the file size in bytes.

    ``indices="implicit"`` writes format 2 (values only; ``selection``, the selection the values
    belong to, is recorded so that readers rebuild the positions). ``save_dtype`` defaults to fp32
    for explicit files and to the model's dtype for implicit ones (see docs/delta-format.md).
    ``text`` (caption -> ``[tokens, width]`` encoding, in order, at most 64) is stored as the
    delta's text encodings (``ffid.text.*``, in their own dtype), for later runs to protect them.
    """
    import torch

    path = Path(path)
    record = None
    if check_indices(indices) == "implicit":
        if selection is None:
            raise ConfigError("an implicit-index delta needs the selection its values belong to")
        record = record_of(selection)
        if save_dtype is None:
            save_dtype = value_code_of(selection.manifest, selection)
    if isinstance(save_dtype, str) and save_dtype in DELTA_VALUE_CODES:
        save_dtype = torch_dtypes()[save_dtype]  # a file's own code, e.g. "BF16" (ffid.value_dtype)
    save_dtype = parse_dtype(save_dtype or "fp32") or torch.float32
    value_code = dtype_code(save_dtype)
    if value_code not in DELTA_VALUE_CODES:
        raise ConfigError(
            f"--save_precision {str(save_dtype).replace('torch.', '')} cannot store delta values; "
            "use fp32, bf16 or fp16"
        )
    # checked before anything is written, like the values
    text_list, text_data, text_meta = text_entries(text or {}, f"delta {path.name}")
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    data: dict[str, Any] = {}
    selected = 0
    tensors = sorted((t for t in tensors if t.count), key=lambda t: t.name)
    if record is not None:
        _check_against_record(tensors, record.counts)
    for t in tensors:
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
        for key, code, shape in delta_entries(t.name, t.shape, t.count, value_code, record is not None):
            if key.endswith(INDEX_SUFFIX):
                assert t.indices is not None  # explicit files are written from known positions
                data[key] = t.indices.to(torch.int64).numpy().astype(NUMPY_INT[code])
            else:
                data[key] = t.values.reshape(shape).to(save_dtype)
                require_finite(
                    data[key],
                    f"tensor {t.name!r} stored as {value_code} in delta {path.name}",
                    "its values overflow that dtype: use --value_dtype fp32",
                    ConfigError,
                )
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
        record=record,
    )
    meta.update(text_meta)
    data.update(text_data)
    return write_safetensors_stream(path, entries + text_list, data.pop, meta)


def _check_against_record(tensors: list[DeltaTensor], counts: Mapping[str, int]) -> None:
    """Implicit files pair values with rebuilt positions by order alone: the tensors and their
    counts must be exactly the selection's."""
    got = {t.name: t.count for t in tensors}
    if got != dict(counts):
        first = next(n for n in sorted(set(got) | set(counts)) if got.get(n) != counts.get(n))
        raise ConfigError(
            f"tensor {first!r} has {got.get(first, 0):,} values but the selection picks "
            f"{counts.get(first, 0):,} positions; an implicit-index delta must hold exactly its selection's "
            "values (write it with --indices explicit otherwise)"
        )


def delta_file_size(
    selection: Selection,
    *,
    title: str = "ffid-delta",
    architecture: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    value_code: str | None = None,
    source: str = "train",
    indices: str = "explicit",
) -> int:
    """Bytes of the delta file :func:`save_delta` writes for ``selection`` to
    ``{title}.safetensors`` with this ``architecture`` and extra ``metadata``, exactly, without
    torch: the writer's own entries and metadata, with each values hash replaced by one of the
    same width. Only the timestamp's value differs, never its length. ``value_code`` defaults
    as in :func:`write_delta`: F32 for explicit files, the model's dtype for implicit ones."""
    record = record_of(selection) if check_indices(indices) == "implicit" else None
    if value_code is None:
        value_code = "F32" if record is None else value_code_of(selection.manifest, selection)
    if value_code not in DELTA_VALUE_CODES:
        raise ConfigError(
            f"delta values cannot be stored as {value_code!r}; "
            f"use one of {', '.join(sorted(DELTA_VALUE_CODES))}"
        )
    entries = [
        e
        for name, pick in selection.items()
        for e in delta_entries(name, pick.shape, pick.count, value_code, record is not None)
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
        record=record,
    )
    head, laid_out = build_header(alignment_order(entries), meta)
    return len(head) + (laid_out[-1].end if laid_out else 0)


def save_delta(
    handle: Any,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    save_dtype: torch.dtype | str | None = None,
    architecture: str | None = None,
    indices: str = "explicit",
    text: Mapping[str, torch.Tensor] | None = None,
) -> int:
    """Save what an attached engine handle trained as a delta file; returns the file size.

    ``handle`` follows the engine contract (``selection``, ``trained_values()``, and
    ``base_sample()`` or ``base_values()`` for the base fingerprint). ``metadata`` adds (or
    overrides) string keys such as ``ss_learning_rate``; ``save_dtype`` is the value precision
    (fp32 by default for explicit files, like other trainers' adapters; the model's dtype for
    ``indices="implicit"``, format 2). ``text``: the run's prompts' text encodings to store
    (see :func:`write_delta`).
    """
    sel: Selection = handle.selection
    trained = handle.trained_values()
    # the engine's handle keeps the fingerprinted base values from when it attached; another
    # handle (the contract is duck-typed) gives all its base values and they are sampled here
    sampled = callable(getattr(handle, "base_sample", None))
    base = handle.base_sample() if sampled else handle.base_values()
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
        picked = sample_positions(idx.numel())
        if vals.numel() != idx.numel() or bvals.numel() != (picked.numel() if sampled else idx.numel()):
            raise ConfigError(
                f"{name!r}: {vals.numel()} trained / {bvals.numel()} base values for {idx.numel()} "
                "selected positions"
            )
        tensors.append(DeltaTensor(name, tuple(pick.shape), idx, vals.detach().cpu()))
        fps[name] = TensorFingerprint(tuple(pick.shape), values_hash(bvals if sampled else bvals[picked]))
    params = dict(sel.params)
    model = getattr(handle, "model", None)
    arch = (
        architecture
        or preset_for(sel.manifest.fingerprint)
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
        indices=indices,
        selection=sel,
        text=text,
    )
