"""musubi-tuner's ``--network_args`` for ffid: parsed and checked before anything is loaded.

musubi hands a network module its ``--network_args`` as ``key=value`` strings (split on ``=``, so
a value cannot contain one). :func:`parse_network_args` turns them into a :class:`MusubiConfig`,
refusing an unknown key, a bad value or a combination that cannot work in one line that names the
key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import torch_dtype, train_names
from ..errors import ConfigError, did_you_mean
from ..preserve import DEFAULT_WEIGHT, METHODS, PreserveSettings, ProjectionSettings
from ..select import DEFAULT_SELECTOR, ROW_SELECTOR, SELECTORS, SelectionSettings, selector_options

# network_args keys -> what they mean (for the error listing them).
NETWORK_ARGS = {
    "ff": "fraction to train, e.g. ff=0.01",
    "ffid": "selection id, e.g. ffid=1",
    "selector": "the selection algorithm: " + ", ".join(SELECTORS),
    **{name: f"{', '.join(owners)}: {opt.help}" for name, (opt, owners) in selector_options().items()},
    "include": "regexes separated by ';'",
    "exclude": "regexes separated by ';'",
    "block_pattern": "regex with one group for the block number",
    "save_dtype": "fp32, bf16, fp16 or auto",
    "store_encodings": "true (default) or false: store the text encodings of the run's first 64 captions in "
    "its deltas, so that later runs protect it without its cache",
    "preserve_cache": "musubi text-encoder cache folders of earlier characters, separated by ';' (adds to "
    "the encodings the --base_weights deltas store)",
    "preserve_deltas": "ffid deltas the --dit already holds (merged into it), separated by ';': not applied "
    "again, their stored captions are protected",
    "preserve_prompts": "captions to protect, separated by ';' (default: all those found)",
    "preserve_weight": "weight of the preservation loss, e.g. preserve_weight=16",
    "preserve_items": "protected inputs per step, e.g. preserve_items=1",
    "preserve_every": "preserve on every N-th training forward",
    "preserve_method": "loss (default) or projection (needs selector=rows; works with --blocks_to_swap)",
    "preserve_energy": "projection: share of the protected inputs' energy to keep, e.g. 0.99",
    "preserve_draws": "projection: the DiT's own drawings per protected prompt, e.g. 4",
    "preserve_times": "projection: re-noising times per drawing, e.g. 2",
    "preserve_steps": "projection: sampler steps of a drawing, e.g. 10",
    "preserve_tokens": "projection: video tokens per protected input sampled into a Gram, e.g. 4096 (0: all)",
    "preserve_bases": "projection: where the bases live, device (default: with the trained values) or cpu",
}
LOSS_ONLY = ("preserve_weight", "preserve_items", "preserve_every")
PROJECTION_ONLY = (
    "preserve_energy",
    "preserve_draws",
    "preserve_times",
    "preserve_steps",
    "preserve_bases",
    "preserve_tokens",
)
PATTERN_SEPARATOR = ";"
_BOOLS = {
    "true": True,
    "1": True,
    "yes": True,
    "on": True,
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}
_SAVE_DTYPES: dict[str, torch.dtype | None] = {
    **{name: torch_dtype(code) for name, code in train_names().items()},
    "auto": None,
}


@dataclass
class MusubiConfig:
    """The parsed ``--network_args``."""

    selection: SelectionSettings
    save_dtype: torch.dtype | None = torch.float32  # None: musubi's dtype
    store_encodings: bool = True  # deltas carry their captions' text encodings (musubi_encodings)
    # preservation (on when any preserve_* key is given): see ffid.integrations.musubi_preserve;
    # the protected prompts are those the --base_weights deltas store, plus preserve_cache's
    preserve_on: bool = False
    preserve_cache: list[str] = field(default_factory=list)
    preserve_deltas: list[str] = field(default_factory=list)  # merged into --dit: protected only
    preserve_prompts: list[str] = field(default_factory=list)
    preserve: PreserveSettings = field(default_factory=lambda: PreserveSettings(items=1))
    preserve_method: str = "loss"  # or "projection": see ffid.integrations.musubi_projection
    projection: ProjectionSettings = field(default_factory=ProjectionSettings)

    @property
    def preserving(self) -> bool:
        """Whether the run protects earlier characters (a ``preserve_*`` key given)."""
        return self.preserve_on or bool(self.preserve_cache)


def _patterns(text: str) -> list[str]:
    return [p.strip() for p in text.split(PATTERN_SEPARATOR) if p.strip()]


def _int_arg(key: str, value: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f'network_args {key}={value!r} is not an integer; write e.g. "{key}=16"') from None


def parse_network_args(kwargs: Mapping[str, Any]) -> MusubiConfig:
    """Turn musubi's ``--network_args`` (a dict of strings) into a :class:`MusubiConfig`.

    Raises :class:`~ffid.errors.ConfigError` naming the bad key or value and the fix.
    """
    args = {str(k).strip(): v for k, v in kwargs.items() if v is not None}
    unknown = [k for k in args if k not in NETWORK_ARGS]
    if unknown:
        raise ConfigError(
            f"unknown network_args key {unknown[0]!r}; {did_you_mean(unknown[0], NETWORK_ARGS)}"
            "ffid.integrations.musubi takes: " + ", ".join(NETWORK_ARGS)
        )
    for key in ("ff", "ffid"):
        if key not in args:
            raise ConfigError(
                f'network_args needs {key}=...; add --network_args "ff=0.01" "ffid=1" '
                "(fraction of the model to train, and which disjoint selection)"
            )
    save_text = str(args.get("save_dtype", "fp32")).strip().lower()
    if save_text not in _SAVE_DTYPES:
        raise ConfigError(f"network_args save_dtype={save_text!r} is unknown; use fp32, bf16, fp16 or auto")
    option_names = selector_options()
    selection = SelectionSettings.create(
        str(args["ff"]).strip(),
        str(args["ffid"]).strip(),
        str(args.get("selector", DEFAULT_SELECTOR)).strip(),
        include=_patterns(str(args.get("include", ""))),
        exclude=_patterns(str(args.get("exclude", ""))),
        block_pattern=str(args["block_pattern"]).strip() if args.get("block_pattern") else None,
        option_flag=lambda name: f"network_args {name}",
        **{k: str(v).strip() for k, v in args.items() if k in option_names},
    )
    store = str(args.get("store_encodings", "true")).strip().lower()
    if store not in _BOOLS:
        raise ConfigError(
            f"network_args store_encodings={store!r} is not true or false; write store_encodings=false"
        )
    return MusubiConfig(
        selection=selection,
        save_dtype=_SAVE_DTYPES[save_text],
        store_encodings=_BOOLS[store],
        **_preserve_args(args),
    )


def _preserve_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The preserve_* network_args, checked. Any of them turns preservation on; what it protects
    (the --base_weights deltas' stored encodings, preserve_cache's) is found when the DiT is there."""
    keys = [k for k in args if k.startswith("preserve_")]
    if not keys:
        return {}
    method = str(args.get("preserve_method", "loss")).strip()
    if method not in METHODS:
        raise ConfigError(
            f"network_args preserve_method={method!r} is unknown; use one of: {', '.join(METHODS)}"
        )
    wrong = [k for k in args if k in (LOSS_ONLY if method == "projection" else PROJECTION_ONLY)]
    if wrong:
        other = "loss" if method == "projection" else "projection"
        raise ConfigError(
            f"network_args {wrong[0]} is a setting of preserve_method={other}, but this run uses "
            f"preserve_method={method}; drop it"
        )
    if method == "projection":
        selector = str(args.get("selector", DEFAULT_SELECTOR)).strip()
        if selector != ROW_SELECTOR:
            raise ConfigError(
                f"network_args preserve_method=projection trains whole rows of Linear weights, but "
                f"selector={selector} takes scattered elements; add selector={ROW_SELECTOR} (and "
                "include=^blocks\\. to train the DiT blocks only)"
            )
        return {
            "preserve_on": True,
            "preserve_cache": _patterns(str(args.get("preserve_cache", ""))),
            "preserve_deltas": _delta_files(args),
            "preserve_prompts": _patterns(str(args.get("preserve_prompts", ""))),
            "preserve_method": method,
            "projection": _projection_settings(args),
        }
    try:
        weight = float(str(args.get("preserve_weight", DEFAULT_WEIGHT)).strip())
    except ValueError:
        raise ConfigError(
            f"network_args preserve_weight={args['preserve_weight']!r} is not a number; write e.g. "
            '"preserve_weight=16"'
        ) from None
    settings = PreserveSettings(
        weight,
        _int_arg("preserve_items", args.get("preserve_items", "1")),
        _int_arg("preserve_every", args.get("preserve_every", "1")),
    ).validate()
    return {
        "preserve_on": True,
        "preserve_cache": _patterns(str(args.get("preserve_cache", ""))),
        "preserve_deltas": _delta_files(args),
        "preserve_prompts": _patterns(str(args.get("preserve_prompts", ""))),
        "preserve": settings,
    }


def _delta_files(args: Mapping[str, Any]) -> list[str]:
    """``preserve_deltas``: files that must exist now, so a typo fails before the DiT loads."""
    files = _patterns(str(args.get("preserve_deltas", "")))
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(
                f"network_args preserve_deltas: {f} is not a file; name the ffid delta (.safetensors) "
                "that was merged into --dit"
            )
    return files


def _projection_settings(args: Mapping[str, Any]) -> ProjectionSettings:
    defaults = ProjectionSettings()
    text = str(args.get("preserve_energy", defaults.energy)).strip()
    try:
        energy = float(text)
    except ValueError:
        raise ConfigError(
            f'network_args preserve_energy={text!r} is not a number; write e.g. "preserve_energy=0.99"'
        ) from None
    return ProjectionSettings(
        energy=energy,
        draws=_int_arg("preserve_draws", args.get("preserve_draws", str(defaults.draws))),
        times=_int_arg("preserve_times", args.get("preserve_times", str(defaults.times))),
        sample_steps=_int_arg("preserve_steps", args.get("preserve_steps", str(defaults.sample_steps))),
        bases=str(args.get("preserve_bases", defaults.bases)).strip(),
        tokens=_int_arg("preserve_tokens", args.get("preserve_tokens", str(defaults.tokens))),
    ).validate()
