"""Text encodings stored in a delta: what a later run needs to protect this run's prompts.

A run protected by preservation on top of earlier deltas needs the earlier prompts' text
encodings (the cross-attention's input). A delta may carry them, so that protecting its
character needs no cache folder of its run (docs/delta-format.md, "Stored text encodings"):

- tensors ``ffid.text.{i}`` for ``i = 0..n-1``: each 2-D ``[tokens, width]``, a float dtype as
  the text encoder's cache held it (umT5 in bf16 for Wan, only the real tokens), every one of
  the same ``width``;
- metadata ``ffid.text_prompts``: a JSON list of the ``n`` distinct captions, in the order of
  the tensors.

Writers store at most :data:`MAX_TEXT_ENCODINGS` of them: the first of the run's recorded
prompts, in recorded order, that have an encoding. Nothing here executes anything; the tensors
are data, read like every other tensor of the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import DELTA_VALUE_CODES, DTYPE_BYTES, dtype_code
from ..errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    import torch

    from .stio import Entry

TEXT_PREFIX = "ffid.text."
KEY_TEXT_PROMPTS = "ffid.text_prompts"
# The most encodings a delta stores. Wan 14B's worst case (umT5 width 4096, bf16, 512 tokens
# each) is 64 x 512 x 4096 x 2 B = 256 MiB, next to a 273-1,090 MiB delta at ff 0.01; a
# character's captions rarely need more to be protected (they share its trigger word).
MAX_TEXT_ENCODINGS = 64
_TEXT_KEY = re.compile(r"^ffid\.text\.(0|[1-9][0-9]*)$")


def text_key(i: int) -> str:
    """The tensor key of the ``i``-th stored encoding."""
    return f"{TEXT_PREFIX}{i}"


def is_text_key(key: str) -> bool:
    """Whether a tensor key belongs to the stored text encodings (``ffid.text.*``)."""
    return key.startswith(TEXT_PREFIX)


@dataclass(frozen=True)
class TextLayout:
    """The stored text encodings of a delta, from its header: captions, keys, width, sizes."""

    prompts: tuple[str, ...]
    keys: tuple[str, ...]  # ffid.text.{i}, in the captions' order
    width: int
    dtypes: tuple[str, ...]  # the distinct dtype codes, sorted
    tokens: int  # summed over all encodings
    nbytes: int

    @property
    def count(self) -> int:
        return len(self.prompts)

    def where(self) -> dict[str, str]:
        """Caption -> tensor key."""
        return dict(zip(self.prompts, self.keys, strict=True))


def _damaged(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"{path}: its stored text encodings are malformed ({why}); re-save it")


def parse_text(path: Path, entries: Mapping[str, Entry], meta: Mapping[str, str]) -> TextLayout | None:
    """The stored text encodings of the delta at ``path`` from its header, checked: the caption
    list, the keys ``ffid.text.0..n-1``, 2-D float tensors of one width. ``None`` when it stores
    none. A key under ``ffid.text.`` that is not one of them is an unexpected tensor."""
    keys = [k for k in entries if is_text_key(k)]
    raw = meta.get(KEY_TEXT_PROMPTS)
    if not keys and raw is None:
        return None
    for k in keys:
        if not _TEXT_KEY.match(k):
            raise ModelFileError(f"{path}: unexpected tensor {k!r} in a delta file; re-save it")
    if raw is None:
        raise _damaged(path, f"{len(keys)} tensor(s) {keys[0]!r}... but no {KEY_TEXT_PROMPTS!r} metadata")
    try:
        prompts = json.loads(raw)
    except (ValueError, RecursionError):
        prompts = None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _damaged(path, f"{KEY_TEXT_PROMPTS} is not a JSON list of strings")
    if len(set(prompts)) != len(prompts):
        raise _damaged(path, f"{KEY_TEXT_PROMPTS} names a caption twice")
    if not prompts and not keys:
        return None  # an empty list stores nothing (writers leave the key out)
    want = [text_key(i) for i in range(len(prompts))]
    if sorted(keys, key=lambda k: int(k[len(TEXT_PREFIX) :])) != want:
        held = ", ".join(sorted(keys)[:3]) + (" ..." if len(keys) > 3 else "") if keys else "none"
        why = f"{KEY_TEXT_PROMPTS} lists {len(prompts)} caption(s), the tensors held are {held}"
        raise _damaged(path, why)
    width = None
    for k in want:
        e = entries[k]
        if e.dtype not in DELTA_VALUE_CODES:
            raise _damaged(path, f"{k!r} holds {e.dtype}, encodings must be floats")
        if len(e.shape) != 2 or e.shape[1] == 0:
            raise _damaged(path, f"{k!r} has shape {list(e.shape)}, an encoding is [tokens, width]")
        if width is None:
            width = e.shape[1]
        elif e.shape[1] != width:
            raise _damaged(path, f"{k!r} is {e.shape[1]} wide, {want[0]!r} {width}")
    return TextLayout(
        prompts=tuple(prompts),
        keys=tuple(want),
        width=int(width or 0),
        dtypes=tuple(sorted({entries[k].dtype for k in want})),
        tokens=sum(entries[k].shape[0] for k in want),
        nbytes=sum(entries[k].nbytes for k in want),
    )


def first_stored(
    prompts: Iterable[str], available: Iterable[str], limit: int = MAX_TEXT_ENCODINGS
) -> list[str]:
    """Which prompts a writer stores: the first ``limit`` distinct ones, in the given (recorded)
    order, that have an encoding in ``available``."""
    have = set(available)
    out: list[str] = []
    for p in dict.fromkeys(prompts):
        if p in have:
            out.append(p)
            if len(out) == limit:
                break
    return out


def text_entries(
    text: Mapping[str, torch.Tensor], where: str
) -> tuple[list[tuple[str, str, tuple[int, ...]]], dict[str, Any], dict[str, str]]:
    """The stored tensors ``(key, dtype code, shape)``, their data and the metadata of ``text``
    (caption -> ``[tokens, width]`` encoding, in order), refused in one line when it breaks the
    format: more than :data:`MAX_TEXT_ENCODINGS`, not 2-D float, widths that differ, NaN/inf."""
    import torch

    from .stio import require_finite

    if len(text) > MAX_TEXT_ENCODINGS:
        raise ConfigError(
            f"{len(text)} text encodings for {where}; a delta stores at most {MAX_TEXT_ENCODINGS} "
            "(take the first ones, ffid.checkpoint.delta_text.first_stored)"
        )
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    data: dict[str, Any] = {}
    width = None
    for i, (prompt, t) in enumerate(text.items()):
        if not isinstance(prompt, str) or not isinstance(t, torch.Tensor):
            raise ConfigError(f"text encodings for {where} must map captions (str) to tensors")
        code = dtype_code(t.dtype) if t.is_floating_point() else str(t.dtype)
        if code not in DELTA_VALUE_CODES or t.dim() != 2 or t.shape[1] == 0:
            raise ConfigError(
                f"the text encoding of {prompt[:40]!r} for {where} is {code} of shape {list(t.shape)}; "
                "it must be a float [tokens, width] tensor"
            )
        if width is not None and t.shape[1] != width:
            raise ConfigError(
                f"the text encodings for {where} differ in width ({width} and {t.shape[1]} for "
                f"{prompt[:40]!r}); store the encodings of one text encoder"
            )
        width = t.shape[1]
        t = t.detach().to("cpu").contiguous()
        require_finite(t, f"the text encoding of {prompt[:40]!r} for {where}", "encode it again", ConfigError)
        key = text_key(i)
        entries.append((key, code, tuple(t.shape)))
        data[key] = t
    meta = {KEY_TEXT_PROMPTS: json.dumps(list(text), ensure_ascii=False)} if text else {}
    return entries, data, meta


def text_bytes(count: int, tokens: int, width: int, code: str = "BF16") -> int:
    """Data bytes of ``count`` stored encodings of ``tokens`` tokens each (for the size bounds)."""
    return count * tokens * width * DTYPE_BYTES[code]


def worst_case_bytes(width: int = 4096, tokens: int = 512, code: str = "BF16") -> int:
    """The most a delta's stored encodings take: :data:`MAX_TEXT_ENCODINGS` of ``tokens`` each
    (Wan: umT5 width 4096, bf16, at most 512 tokens: 256 MiB)."""
    return text_bytes(MAX_TEXT_ENCODINGS, tokens, width, code)
