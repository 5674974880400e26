"""Protected prompts' text encodings carried by the earlier deltas themselves.

A delta may store the text encodings of its run's prompts (``ffid.text.*``,
:mod:`ffid.checkpoint.delta_text`), so that a later run protects that character with no cache
folder of its run. Both ``ffid train`` (the wan task) and the musubi-tuner network module look a
protected prompt up here first, then in their cache folders.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

# The first Linear of a Wan DiT's text embedding (original and diffusers naming): [dim, text width]
TEXT_EMBEDDING = ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight")


@dataclass
class StoredEncodings:
    """Where the base deltas keep their prompts' encodings, and which deltas keep any."""

    # caption -> (delta file, tensor key): a delta is a safetensors file, so it is read like a cache
    where: dict[str, tuple[Path, str]] = field(default_factory=dict)
    carriers: list[str] = field(default_factory=list)  # file names of the deltas that store encodings
    without: list[str] = field(default_factory=list)  # file names of the deltas that store none
    notes: list[str] = field(default_factory=list)  # for the run's log


def stored_encodings(
    deltas: Iterable[str | os.PathLike[str]], width: int | None, *, cache_flag: str, caches_given: bool
) -> StoredEncodings:
    """The encodings the deltas store, first delta first, each checked against the model's text
    ``width`` (None: unknown, not checked).

    A delta whose encodings have another width was made for another text encoder: refused in one
    line naming both widths, unless the user gives cache folders (``caches_given``, named by
    ``cache_flag`` in the message), which then supply the prompts instead. A malformed delta is
    refused by :class:`~ffid.checkpoint.delta.DeltaFile` ("re-save it").
    """
    from ..checkpoint.delta import DeltaFile

    out = StoredEncodings()
    for d in deltas:
        path = Path(d)
        with DeltaFile(path) as df:
            text = df.text
        if text is None or not text.count:
            out.without.append(path.name)
            continue
        if width is not None and text.width != width:
            if caches_given:
                out.notes.append(
                    f"{path.name} stores text encodings {text.width} wide but this model's text input is "
                    f"{width} wide: they are not used, its prompts are looked up in {cache_flag}"
                )
                continue
            raise ConfigError(
                f"{path}: its stored text encodings are {text.width} wide but this model's text input is "
                f"{width} wide (the delta was made for another text encoder); use a delta made for this "
                f"model, or give the earlier character's cache folder with {cache_flag}"
            )
        out.carriers.append(path.name)
        for prompt, key in text.where().items():
            out.where.setdefault(prompt, (path, key))
    return out


def model_text_width(model: object) -> int | None:
    """The text input width of a Wan DiT (umT5's 4096 for Wan 2.x), from its text embedding's
    weight in either naming; None when the model has none."""
    named = getattr(model, "named_parameters", None)
    if not callable(named):
        return None
    from ..names import canonical_name

    for name, p in named():
        if canonical_name(name) in TEXT_EMBEDDING:
            return int(p.shape[1])
    return None
