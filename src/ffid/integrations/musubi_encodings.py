"""Text encodings in musubi-tuner runs: the ones a delta carries, and the ones a run protects.

Writing: a delta saved by :class:`~ffid.integrations.musubi.FfidNetwork` records its run's
captions (``ffid.prompts``) and stores the text encodings of the first
:data:`~ffid.checkpoint.delta.MAX_TEXT_ENCODINGS` of them (``ffid.text.*``), so that a later run
protects that character with no access to its cache. The captions and encodings are found
through musubi's own ``--dataset_config`` (each dataset's ``cache_directory``, where
``wan_cache_text_encoder_outputs.py`` wrote ``*_wan_te.safetensors``): the file is parsed as data
(``tomllib`` / ``json``), nothing in it is executed. When they cannot be found, the delta is
written without them and one log line says why. Both Wan 2.2 experts' deltas carry the same ones.

Reading: the protected prompts of a run with ``preserve_*`` network_args are the encodings the
``--base_weights`` deltas store, then those of the ``preserve_cache`` folders (which add to them).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, FfidError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)


def _cache_folders(config_path: str | Path) -> list[Path]:
    """The cache folder of every dataset of a musubi dataset config, in order (musubi's rule: a
    dataset's ``cache_directory``, else its image or video directory)."""
    path = Path(config_path)
    raw = path.read_bytes()
    config = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode("utf-8"))
    general = config.get("general") or {}
    folders = []
    for ds in config.get("datasets") or []:
        if not isinstance(ds, dict):
            continue
        for key in ("cache_directory", "image_directory", "video_directory"):
            value = ds.get(key, general.get(key) if key == "cache_directory" else None)
            if isinstance(value, str) and value:
                folders.append(Path(value))
                break
    return folders


class RunText:
    """The captions of a musubi run and where their text encodings are (see module docstring)."""

    def __init__(self, captions: list[str], stored: dict[str, tuple[Path, str]]):
        self.captions = captions  # every caption of the run's datasets, first file first
        self.stored = stored  # caption -> (file, key): what each delta stores

    @staticmethod
    def from_args(args: Any, store: bool = True) -> RunText:
        """Find the run's captions from ``args.dataset_config``; logs one line when it cannot."""
        from ..checkpoint.delta import first_stored
        from ..train.cache import text_encodings

        config = getattr(args, "dataset_config", None)
        if not config:
            logger.info(
                "ffid: no --dataset_config, so the deltas record no captions and store no text encodings"
            )
            return RunText([], {})
        sources: dict[str, tuple[Path, str]] = {}
        try:
            for folder in _cache_folders(config):
                for caption, where in text_encodings(folder).items():
                    sources.setdefault(caption, where)
        except (OSError, ValueError, UnicodeDecodeError, FfidError) as exc:
            why = " ".join(str(exc).split())[:200] or type(exc).__name__
            logger.warning(
                "ffid: the text encodings of --dataset_config %s cannot be read (%s); the deltas are saved "
                "without them, so a later run protects this character only through preserve_cache",
                config,
                why,
            )
            return RunText([], {})
        captions = [c for c in sources if c]
        if not captions:
            logger.warning(
                "ffid: the cache folders of --dataset_config %s hold no text encodings "
                "(*_wan_te.safetensors); the deltas are saved without them, so a later run protects this "
                "character only through preserve_cache",
                config,
            )
            return RunText([], {})
        stored = {c: sources[c] for c in first_stored(captions, sources)} if store else {}
        logger.info(
            "ffid: the deltas record %d caption(s) and store the text encodings of %d%s",
            len(captions),
            len(stored),
            "" if store else " (store_encodings=false)",
        )
        return RunText(captions, stored)

    def metadata(self, md: Mapping[str, str]) -> dict[str, str]:
        """``md`` with the run's captions as ``ffid.prompts``, unless it already has them."""
        from ..preserve.prompts import PROMPTS_KEY, prompt_metadata

        out = dict(md)
        if self.captions and PROMPTS_KEY not in out:
            out[PROMPTS_KEY] = prompt_metadata(self.captions)[PROMPTS_KEY]
        return out

    def read(self) -> dict[str, torch.Tensor] | None:
        """The stored encodings, read now (None when the deltas store none)."""
        if not self.stored:
            return None
        from ..train.cache import read_text_encodings

        return read_text_encodings(self.stored)


def protected_encodings(
    base_weights: list[str],
    preserve_cache: list[str],
    wanted: list[str],
    width: int | None,
    merged: list[str] | None = None,
) -> dict[str, tuple[Path, str]]:
    """Caption -> (file, key) of the prompts a run protects: those the ``--base_weights`` deltas
    store, then the ``merged`` ones (``preserve_deltas``: already in the DiT), each checked against
    the model's text ``width``, then those of the ``preserve_cache`` folders; with ``wanted``
    (``preserve_prompts``), only those, each of which must be found."""
    from ..preserve.stored import stored_encodings
    from ..train.cache import text_encodings

    merged = list(merged or [])
    stored = stored_encodings(
        [*base_weights, *merged],
        width,
        cache_flag="network_args preserve_cache=FOLDER",
        caches_given=bool(preserve_cache),
    )
    for note in stored.notes:
        logger.info("ffid preservation: %s", note)
    found = dict(stored.where)
    for folder in preserve_cache:
        for caption, where in text_encodings(folder).items():
            found.setdefault(caption, where)
    merged_names = {Path(m).name for m in merged}

    def flag(name: str) -> str:
        return f"preserve_deltas {name}" if name in merged_names else f"--base_weights {name}"

    sources = [*(flag(n) for n in stored.carriers), *preserve_cache]
    if wanted:
        missing = [p for p in wanted if p not in found]
        if missing:
            raise ConfigError(
                f"network_args preserve_prompts: {missing[0]!r} has no text encoding in "
                f"{', '.join(sources) or 'the --base_weights deltas'}; cache it with "
                "wan_cache_text_encoder_outputs.py into a folder and add it as preserve_cache=FOLDER"
            )
        found = {p: found[p] for p in wanted}
    if stored.without and not preserve_cache and not wanted:  # its character would go unprotected
        raise ConfigError(
            f"{flag(stored.without[0])} stores no text encodings (saved by an older ffid, by "
            "`ffid extract`, or with store_encodings=false), so ffid cannot know what to protect; give "
            "the earlier character's musubi cache folder with network_args preserve_cache=FOLDER"
        )
    if found:
        from_deltas = sum(1 for p, w in found.items() if stored.where.get(p) == w)
        logger.info(
            "ffid preservation: %d prompt(s) from the text encodings stored in %s, %d from preserve_cache",
            from_deltas,
            ", ".join(stored.carriers) or "no --base_weights or preserve_deltas delta",
            len(found) - from_deltas,
        )
        return found
    if preserve_cache:
        raise ConfigError(
            f"network_args preserve_cache {', '.join(preserve_cache)} holds no text encodings "
            "(*_wan_te.safetensors); point it at the earlier character's musubi cache_directory"
        )
    raise ConfigError(
        "the preserve_* network_args protect earlier characters, but this run has none: give their "
        "deltas with --base_weights (ffid deltas carry their captions' text encodings), or their musubi "
        "cache folders with network_args preserve_cache=FOLDER"
    )
