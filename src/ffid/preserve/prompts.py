"""The protected prompts: what a run must keep, read from earlier deltas' metadata.

Both preservation methods (:mod:`.loss`, :mod:`.projection`) protect the same set: the prompts
each earlier delta recorded, the user's ``preserve_prompts``, the run's regularisation prompts and
the empty prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.delta import KEY_PROMPTS, KEY_TRIGGER_WORDS
from ..errors import ConfigError

PROMPTS_KEY = KEY_PROMPTS  # delta metadata: JSON list of the prompts/captions a run trained
TRIGGER_KEY = KEY_TRIGGER_WORDS  # delta metadata: JSON list of the run's trigger words
MAX_RECORDED = 1000  # prompts recorded per delta (a caption per image can be many)
EMPTY_LABEL = "<empty>"


@dataclass(frozen=True)
class Protected:
    """One protected prompt and where it came from (a delta file, ``empty``, ``regularisation``, ``user``)."""

    prompt: str
    source: str

    @property
    def label(self) -> str:
        """A short name for logs: the prompt, cut to 40 characters, or ``<empty>``."""
        if not self.prompt:
            return EMPTY_LABEL
        return self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."


def _string_list(raw: str | None, key: str, path: Path) -> list[str]:
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{path}: metadata {key!r} is not a JSON list of strings; re-save the delta or give the "
            "prompts with preserve_prompts"
        )
    return value


def recorded_prompts(delta: str | Path) -> list[str] | None:
    """The prompts and trigger words a delta's run recorded, or ``None`` when it recorded none
    (a delta from ``ffid extract``, an older ffid, or another tool). Reads the header only."""
    from ..checkpoint.delta import DeltaFile

    path = Path(delta)
    meta = DeltaFile(path).metadata
    if PROMPTS_KEY not in meta and TRIGGER_KEY not in meta:
        return None
    return _string_list(meta.get(PROMPTS_KEY), PROMPTS_KEY, path) + _string_list(
        meta.get(TRIGGER_KEY), TRIGGER_KEY, path
    )


def prompt_metadata(prompts: Iterable[str], trigger_words: Iterable[str] = ()) -> dict[str, str]:
    """Delta metadata recording what a run trained, for later runs to protect."""
    unique = list(dict.fromkeys(p for p in prompts if isinstance(p, str)))[:MAX_RECORDED]
    meta = {PROMPTS_KEY: json.dumps(unique, ensure_ascii=False)}
    words = list(dict.fromkeys(trigger_words))
    if words:
        meta[TRIGGER_KEY] = json.dumps(words, ensure_ascii=False)
    return meta


def protected_prompts(
    base_deltas: Sequence[str | Path],
    *,
    empty: bool = True,
    regularisation: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[Protected]:
    """The protected prompts of a run on top of ``base_deltas``, deduplicated, in a fixed order:
    each delta's recorded prompts, the user's ``extra``, the regularisation prompts, the empty one.

    A delta that recorded nothing is an error unless the user gives ``extra`` prompts: without
    them that delta's character would silently go unprotected.
    """
    out: dict[str, Protected] = {}
    silent = []
    for delta in base_deltas:
        got = recorded_prompts(delta)
        if got is None:
            silent.append(Path(delta).name)
            continue
        for p in got:
            out.setdefault(p, Protected(p, Path(delta).name))
    if silent and not extra:
        raise ConfigError(
            f"base delta {silent[0]!r} records no prompts (it was made by `ffid extract`, another tool or "
            "an older ffid), so preservation cannot know what it taught; give its trigger prompt(s) "
            "with preserve_prompts = ['...'], or set preserve = 'off'"
        )
    for p in extra:
        out.setdefault(p, Protected(p, "user"))
    for p in regularisation:
        out.setdefault(p, Protected(p, "regularisation"))
    if empty:
        out.setdefault("", Protected("", "empty"))
    return list(out.values())


def describe_protected(protected: Sequence[Protected], shown: int = 6) -> str:
    """``protecting N prompt(s): 'a' (source), ...``: the log line both methods print."""
    listed = ", ".join(f"{p.label!r} ({p.source})" for p in protected[:shown])
    more = f" and {len(protected) - shown} more" if len(protected) > shown else ""
    return f"protecting {len(protected)} prompt(s): {listed}{more}"
