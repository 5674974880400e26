"""``ffid convert``: rewrite a delta with explicit or implicit indices and another value dtype.

The positions never change: an explicit file becomes implicit only when its stored indices are
exactly what its recorded selection plans on the base (checked element by element), and an
implicit file becomes explicit by writing the positions its selection rebuilds. Stored text
encodings (``ffid.text.*``) are carried over as they are, or left out with ``drop_text`` (a
later run then protects the run's prompts through a cache or its recorded prompts). The base's
shapes come from ``base`` or, when the delta was planned on a built-in preset, from the preset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, MismatchError
from ..selection import Selection
from .atomic import refuse_overwrite
from .delta_format import (
    KEY_PROMPTS,
    KEY_TRIGGER_WORDS,
    DeltaTensor,
    preset_for,
)
from .delta_read import DeltaFile
from .delta_write import write_delta
from .implicit import base_manifest, check_indices

# Metadata a conversion carries over: everything but the format's own ``ffid.*`` keys, which the
# writer sets again (the run's prompts and trigger words are the run's, so they stay).
_KEEP_FFID = (KEY_PROMPTS, KEY_TRIGGER_WORDS)


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    path: Path
    indices: str
    value_dtype: str
    tensors: int
    elements: int
    bytes_in: int
    bytes_written: int
    text_dropped: int = 0  # stored text encodings left out (drop_text)


def _planned(df: DeltaFile, base: Any | None) -> Selection:
    """The selection of ``df``'s positions, planned on the base (or its preset) and checked."""
    from ..select import SELECTORS, SelectionSettings

    name = df.path.name
    source = base if base is not None else preset_for(df.info.base_manifest_fingerprint)
    if source is None:
        raise ConfigError(
            f"{name} was planned on a model that is not a built-in preset; give its base with --base BASE "
            "so that the positions can be planned from its shapes"
        )
    if df.implicit:
        selection = df.bind(source)
        assert selection is not None
        return selection
    info = df.info
    if info.selector not in SELECTORS or info.ff is None or info.ffid is None:
        raise ConfigError(
            f"{name} holds positions no selector plans (selector {info.selector!r}, e.g. an unrestricted "
            "extract); it can only stay --indices explicit"
        )
    selector = SELECTORS[info.selector]
    options = {o.name: info.params[o.name] for o in selector.options if o.name in info.params}
    try:
        settings = SelectionSettings.create(
            info.ff,
            info.ffid,
            info.selector,
            include=info.params.get("include"),
            exclude=info.params.get("exclude"),
            **options,
        )
    except ConfigError as exc:
        raise ConfigError(f"{name} records selection settings that are not valid ({exc})") from None
    sel = settings.plan(base_manifest(source, info.naming))
    if sel.fingerprint != info.selection_fingerprint or set(sel) != set(df.names):
        raise MismatchError(
            f"{name}: its recorded selection plans fingerprint {sel.fingerprint} on this base, the file "
            f"records {info.selection_fingerprint}; its positions cannot be rebuilt, keep --indices explicit"
        )
    for n in df.names:
        if not np.array_equal(df.read_indices_np(n), sel.indices(n).numpy()):
            raise MismatchError(
                f"{name}: the stored positions of tensor {n!r} differ from those its selection plans; they "
                "cannot be rebuilt, keep --indices explicit"
            )
    return sel


def convert_delta(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    indices: str | None = None,
    value_dtype: str | None = None,
    base: Any | None = None,
    drop_text: bool = False,
) -> ConvertResult:
    """Write ``src`` to ``out`` with ``indices`` (``explicit``/``implicit``; default the file's
    own) and ``value_dtype`` (default the file's own), without its stored text encodings when
    ``drop_text``. ``base`` gives the shapes; a preset's are used when it is omitted."""
    if indices is not None:
        check_indices(indices)
    out = Path(out)
    with DeltaFile(src) as df:
        indices = indices or ("implicit" if df.implicit else "explicit")
        if out.is_dir():
            raise ConfigError(f"output {out} is a folder; name the delta file, e.g. {out / df.path.name}")
        refuse_overwrite(out, [df.path])
        need_plan = df.implicit or indices == "implicit"
        sel = _planned(df, base) if need_plan else None
        tensors = [
            DeltaTensor(
                n, df.shape(n), df.read_indices(n) if indices == "explicit" else None, df.read_values(n)
            )
            for n in df.names
        ]
        info = df.info
        keep = {k: v for k, v in df.metadata.items() if not k.startswith("ffid.") or k in _KEEP_FFID}
        size = write_delta(
            out,
            tensors,
            selector=info.selector,
            params=info.params,
            selection_fingerprint=info.selection_fingerprint,
            base_fingerprint=info.base_fingerprint,
            base_manifest_fingerprint=info.base_manifest_fingerprint,
            naming=info.naming,
            total_params=info.total_params,
            source=info.source,
            metadata=keep,
            save_dtype=value_dtype or info.value_dtype or "fp32",
            indices=indices,
            selection=sel,
            # the run's prompts' encodings stay with it, in their dtype, unless asked to go
            text=None if drop_text else df.text_encodings(),
        )
        result = ConvertResult(
            out,
            indices,
            "",
            len(tensors),
            sum(t.count for t in tensors),
            df.path.stat().st_size,
            size,
            df.text_count if drop_text else 0,
        )
    with DeltaFile(out) as written:
        result.value_dtype = written.info.value_dtype
    return result
