# ruff: noqa: RUF009  (_key wraps dataclasses.field to attach help text and flags)
"""The trainer's configuration: kohya-style keys, read from TOML and/or command-line flags.

One dataclass, :class:`TrainConfig`, lists every key with its type, default and help text; the
TOML reader, the CLI flags and the docs are all derived from it, so a key cannot exist in one
place and not in the others. Unknown keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import TRAIN_DTYPES
from ..errors import ConfigError, MissingFileError, did_you_mean
from ..estimate.projection import TOKEN_BUDGET
from ..select import DEFAULT_SELECTOR, SELECTORS, SelectionSettings

SELECTOR_NAMES = tuple(SELECTORS)
SELECTOR_OPTIONS = "; ".join(
    f"{s.name}: " + ", ".join(f"{o.name} ({o.help}, default {o.default})" for o in s.options)
    for s in SELECTORS.values()
    if s.options
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MIXED_PRECISION = ("no", "fp16", "bf16")
DTYPES = ("auto", *TRAIN_DTYPES)
SAVE_PRECISION = TRAIN_DTYPES
TIMESTEP_SAMPLING = ("shift", "uniform", "sigmoid")
PRESERVE = ("auto", "on", "off")
PRESERVE_METHODS = ("loss", "projection")


def _key(
    help_text: str,
    default: Any = None,
    *,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    trajectory: bool = False,
    factory: Any = None,
) -> Any:
    """A config field; ``trajectory`` marks keys that change the training path (resume checks them)."""
    meta = {"help": help_text, "choices": choices, "aliases": aliases, "trajectory": trajectory}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every key ``ffid train`` accepts (TOML file and ``--flags`` share these names)."""

    # -- model and data ------------------------------------------------------------------------
    model_type: str = _key(
        "what to train: wan, causal-lm, a task registered under the ffid.tasks entry point (demo), or "
        "a dotted path 'pkg.module:factory' returning a Task (runs its code: needs --allow_plugins)",
        "wan",
        trajectory=True,
    )
    model_path: str | None = _key(
        "model folder (diffusers/transformers layout) or single .safetensors file",
        aliases=("dit",),
        trajectory=True,
    )
    model_dtype: str = _key(
        "dtype the base weights are loaded in (auto: as stored in the files)",
        "auto",
        choices=DTYPES,
        trajectory=True,
    )
    dataset: str | None = _key(
        "wan: folder of cached items (see `ffid cache`); causal-lm: a .txt/.jsonl file or a folder of them",
        trajectory=True,
    )
    rehearsal_datasets: list[str] = _key(
        "more datasets of the same kind trained on together with dataset, e.g. character1's cache "
        "while training character2 on top of it, so character2 does not wash character1 out",
        factory=list,
        trajectory=True,
    )
    batch_size: int = _key("items per micro-batch and process", 1, trajectory=True)
    seq_len: int = _key("causal-lm: tokens per training sequence", 512, trajectory=True)
    text_field: str = _key("causal-lm: the field holding the text in .jsonl lines", "text", trajectory=True)
    timestep_sampling: str = _key(
        "wan: how flow-matching times t are drawn", "shift", choices=TIMESTEP_SAMPLING, trajectory=True
    )
    discrete_flow_shift: float = _key(
        "wan: shift applied to t (t' = s t / (1 + (s - 1) t)), 1 = none", 3.0, trajectory=True
    )
    sigmoid_scale: float = _key("wan: scale of the normal draw before the sigmoid", 1.0, trajectory=True)
    task_args: dict[str, Any] = _key(
        "options for the task (a TOML table, or k=v flags); a key the task does not read is refused",
        factory=dict,
        trajectory=True,
    )
    base_deltas: list[str] = _key(
        "delta files applied to the base before training (train on top of them)",
        factory=list,
        trajectory=True,
    )
    trigger_words: list[str] = _key(
        "trigger words of this run, recorded in its delta (with the trained captions) so that later "
        "runs on top of it protect them",
        factory=list,
    )
    store_encodings: bool = _key(
        "wan: store the text encodings of the first 64 recorded captions in each delta (as cached, e.g. "
        "bf16), so that later runs protect this run without its cache folder (docs/delta-format.md)",
        True,
    )
    # -- preservation (training on top of base_deltas) -----------------------------------------
    preserve: str = _key(
        "keep what base_deltas taught while training on top of them, without their data: a second "
        "loss pulls the model towards base + base_deltas on protected prompts (auto: on when "
        "base_deltas or preserve_deltas are given)",
        "auto",
        choices=PRESERVE,
        trajectory=True,
    )
    preserve_method: str = _key(
        "how preservation keeps base_deltas: 'loss' (a distance to base + base_deltas added to the loss; "
        "any selector) or 'projection' (every trained row's change kept off the inputs its layer sees "
        "for the protected prompts; needs selector = 'rows')",
        "loss",
        choices=PRESERVE_METHODS,
        trajectory=True,
    )
    preserve_energy: float = _key(
        "projection: share of the sampled (image-side) protected inputs' energy the bases keep; the text "
        "side is kept whole",
        0.99,
        trajectory=True,
    )
    preserve_draws: int = _key(
        "projection: the model's own drawings per protected prompt in the feature pass", 4, trajectory=True
    )
    preserve_times: int = _key(
        "projection: random re-noising times per drawing in the feature pass", 2, trajectory=True
    )
    preserve_tokens: int = _key(
        "projection: image-side token rows per protected input sampled into a layer's Gram matrix "
        "(0: all; the text side always takes all)",
        TOKEN_BUDGET,
        trajectory=True,
    )
    preserve_weight: float = _key("weight of the preservation loss", 16.0, trajectory=True)
    preserve_items: int = _key(
        "protected inputs per preservation step (0: a quarter of batch_size, at least 1)", 0, trajectory=True
    )
    preserve_every: int = _key("preserve on every N-th optimizer step", 1, trajectory=True)
    preserve_prompts: list[str] = _key(
        "more prompts to protect, besides those the base_deltas recorded (needed for deltas that "
        "recorded none)",
        factory=list,
        trajectory=True,
    )
    preserve_empty: bool = _key(
        "also protect the empty prompt, which classifier-free guidance uses at every sampling step",
        True,
        trajectory=True,
    )
    preserve_regularisation: bool = _key(
        "also protect this run's regularisation (prior) prompts, where the task has them",
        True,
        trajectory=True,
    )
    preserve_deltas: list[str] = _key(
        "deltas the base already holds (merged into it with `ffid merge`): not applied again, but "
        "their recorded prompts are protected, with the text encodings they store",
        factory=list,
        trajectory=True,
    )
    preserve_cache: list[str] = _key(
        "wan: more cache folders holding text encodings of protected prompts (matched by caption)",
        factory=list,
        trajectory=True,
    )
    # -- selection -----------------------------------------------------------------------------
    ff: float | None = _key("fraction of the model's weights to train, 0 < ff <= 1", trajectory=True)
    ffid: int | None = _key("selection id: different ids never share a weight", trajectory=True)
    selector: str = _key(
        "selection algorithm (" + ", ".join(SELECTOR_NAMES) + ")", DEFAULT_SELECTOR, trajectory=True
    )
    selector_args: dict[str, Any] = _key(
        "options of the selector (a TOML table, or k=v flags): " + SELECTOR_OPTIONS,
        factory=dict,
        trajectory=True,
    )
    slots: int | None = _key("the selector option slots (same as selector_args.slots)", trajectory=True)
    include: list[str] = _key(
        "regexes: only tensors whose name matches one are trained", factory=list, trajectory=True
    )
    exclude: list[str] = _key(
        "regexes: tensors whose name matches one are never trained", factory=list, trajectory=True
    )
    # -- optimisation --------------------------------------------------------------------------
    optimizer_type: str = _key(
        "AdamW, AdamW8bit, Adafactor, SGD, or a dotted path to an optimizer class (outside "
        "torch.optim it runs code: needs --allow_plugins)",
        "AdamW",
        trajectory=True,
    )
    optimizer_args: list[str] = _key(
        "extra optimizer arguments as k=v (e.g. weight_decay=0.01)", factory=list, trajectory=True
    )
    learning_rate: float = _key("peak learning rate", 1e-4, trajectory=True)
    lr_scheduler: str = _key(
        "constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, ...",
        "constant",
        trajectory=True,
    )
    lr_warmup_steps: int = _key("linear warm-up steps", 0, trajectory=True)
    max_grad_norm: float = _key("clip gradients to this norm (0 = no clipping)", 1.0, trajectory=True)
    gradient_accumulation_steps: int = _key("micro-batches per optimizer step", 1, trajectory=True)
    max_train_steps: int | None = _key("optimizer steps to train (default 1600 unless max_train_epochs)")
    max_train_epochs: int | None = _key("epochs to train (overrides max_train_steps)")
    seed: int = _key("seed for data order, noise and timesteps", 42, trajectory=True)
    mixed_precision: str = _key("autocast precision", "no", choices=MIXED_PRECISION, trajectory=True)
    gradient_checkpointing: bool = _key("recompute activations in backward to save memory", False)
    blocks_to_swap: int = _key("keep the base weights of the last N blocks on the CPU between uses", 0)
    # -- saving and logging --------------------------------------------------------------------
    output_dir: str = _key("folder for deltas, states, logs and plots", "output")
    output_name: str = _key("file name stem of the outputs", "ffid")
    save_every_n_steps: int | None = _key("save a delta (and state) every N steps")
    save_every_n_epochs: int | None = _key("save a delta (and state) at the end of every N epochs")
    save_state: bool = _key("also save a resumable training state next to each delta", False)
    resume: str | None = _key("a '*-state' folder to resume from (or 'latest' in output_dir)")
    save_precision: str = _key(
        "dtype of the saved full checkpoint (deltas keep fp32 values)", "bf16", choices=SAVE_PRECISION
    )
    delta_indices: str = _key(
        "delta format: 'explicit' (format 1: positions and fp32 values) or 'implicit' (format 2: values "
        "in the model's dtype only, positions rebuilt from the base's shapes; 4x smaller, read by ffid "
        "only; docs/delta-format.md)",
        "explicit",
        choices=("explicit", "implicit"),
    )
    save_full: bool = _key("also save the full model with the trained values at the end", False)
    logging_dir: str | None = _key("TensorBoard folder (default {output_dir}/logs; 'none' disables)")
    sample_every_n_steps: int | None = _key("call the task's sample() every N steps into {output_dir}/sample")
    progress: bool = _key("show the tqdm progress bar", True)

    # -- helpers -------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Check value ranges that types alone do not catch; returns self."""
        for name in ("batch_size", "seq_len", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} = {getattr(self, name)} must be at least 1")
        for name in (
            "max_train_steps",
            "max_train_epochs",
            "save_every_n_steps",
            "save_every_n_epochs",
            "sample_every_n_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} = {value} must be at least 1 (leave it out to disable)")
        for name in ("blocks_to_swap", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} = {getattr(self, name)} must be 0 or more")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate = {self.learning_rate} must be a positive number such as 1e-4")
        if self.preserve_items < 0:
            raise ConfigError(f"preserve_items = {self.preserve_items} must be 0 (auto) or more")
        from ..preserve import PreserveSettings  # the one place the preservation settings are checked

        PreserveSettings(self.preserve_weight, max(1, self.preserve_items), self.preserve_every).validate()
        self.projection_settings()
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm = {self.max_grad_norm} must be 0 (off) or positive")
        if not (math.isfinite(self.sigmoid_scale) and self.sigmoid_scale > 0):
            raise ConfigError(
                f"sigmoid_scale = {self.sigmoid_scale} must be a positive number (1 = the standard "
                "normal draw); 0 would give every item the same timestep"
            )
        if self.discrete_flow_shift <= 0:
            raise ConfigError(
                f"discrete_flow_shift = {self.discrete_flow_shift} must be positive (1 = no shift)"
            )
        if not self.output_name or any(c in self.output_name for c in "/\\"):
            raise ConfigError(
                f"output_name {self.output_name!r} must be a plain file name stem such as 'char1'"
            )
        parse_kv_list(self.optimizer_args, "optimizer_args")
        if self.ff is not None and self.ffid is not None:
            self.selection()
        return self

    def projection_settings(self) -> Any:
        """The :class:`~ffid.preserve.ProjectionSettings` of ``preserve_method = 'projection'``."""
        from ..preserve import ProjectionSettings

        return ProjectionSettings(
            energy=self.preserve_energy,
            draws=self.preserve_draws,
            times=self.preserve_times,
            tokens=self.preserve_tokens,
        ).validate()

    @property
    def earlier_deltas(self) -> list[str]:
        """The deltas whose characters the run protects: those it applies (``base_deltas``), then
        those the base already holds (``preserve_deltas``, merged into it: not applied again)."""
        return [*self.base_deltas, *self.preserve_deltas]

    def selection(self) -> SelectionSettings:
        """The run's :class:`~ffid.select.SelectionSettings` (what ``ffid plan`` shows for the same keys)."""
        if self.ff is None or self.ffid is None:
            raise ConfigError(
                "ff and ffid are required; add e.g. ff = 0.01 and ffid = 1 to the config or flags"
            )
        return SelectionSettings.create(
            self.ff,
            self.ffid,
            self.selector,
            include=self.include,
            exclude=self.exclude,
            option_flag=lambda name: f"selector_args.{name} =",
            **self._selector_options(),
        )

    def _selector_options(self) -> dict[str, Any]:
        """``selector_args`` with the older ``slots`` key folded in (given both ways: refused)."""
        options = dict(self.selector_args)
        if self.slots is not None:
            if "slots" in options:
                raise ConfigError(
                    f"slots = {self.slots} and selector_args.slots = {options['slots']!r} both set the "
                    "layout; keep one of them"
                )
            options["slots"] = self.slots
        return options

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-ready values."""
        return dataclasses.asdict(self)

    def trajectory_hash(self) -> str:
        """16 hex digits over the keys that change what training computes (not paths or logging)."""
        blob = json.dumps(self.trajectory_keys(), sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()

    def trajectory_keys(self) -> dict[str, Any]:
        """The values :meth:`trajectory_hash` covers (saved in states to explain a mismatch).

        Model, data and base-delta paths count by file name, so a run moved to another disk resumes.
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["trajectory"]}
        for name in ("model_path", "dataset"):
            if out[name]:
                out[name] = Path(out[name]).name
        for name in ("base_deltas", "preserve_deltas", "rehearsal_datasets", "preserve_cache"):
            out[name] = [Path(p).name for p in out[name]]
        if not out["preserve_deltas"]:  # a key newer than saved states: unset, their hash holds
            out.pop("preserve_deltas")
        # The selector options count as checked values, however they were written (slots = 8 or
        # selector_args = {slots = "8"}), and in the form states saved before selector_args
        # existed hold them: slots as its own key, selector_args only when it holds more.
        have_ids = self.ff is not None and self.ffid is not None
        options = dict(self.selection().options) if have_ids else self._selector_options()
        out["slots"] = options.pop("slots", None)
        out.pop("selector_args")
        if options:
            out["selector_args"] = dict(sorted(options.items()))
        return json.loads(json.dumps(out, default=str))


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
ALIASES: dict[str, str] = {a: f.name for f in FIELDS.values() for a in f.metadata["aliases"]}


def keys_markdown() -> str:
    """The table of every key (name, aliases, default, help, choices) that docs/train.md shows."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for f in FIELDS.values():
        meta = f.metadata
        key = f"`{f.name}`" + (
            " (" + ", ".join(f"`{a}`" for a in meta["aliases"]) + ")" if meta["aliases"] else ""
        )
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        default = "–" if value is None else f"`{value!r}`"
        meaning = meta["help"]
        if meta["choices"]:
            meaning += f" ({' / '.join(meta['choices'])})"
        if meta["trajectory"]:
            meaning += " · resume-checked"
        lines.append(f"| {key} | {default} | {meaning} |")
    return "\n".join(lines)


def _base_type(name: str) -> Any:
    """The non-None type of a field (``int | None`` -> ``int``)."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def _nearest(key: str) -> str:
    hint = did_you_mean(key, [*FIELDS, *ALIASES], cutoff=0.5).rstrip()
    return f"; {hint}" if hint else "; valid keys are listed by `ffid train --help`"


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check and convert one value to its field's type, with an error naming the key."""
    if value is None:
        return None
    typ = _base_type(name)
    origin = typing.get_origin(typ) or typ
    bad = ConfigError
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if origin is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if origin is str:
            choices = FIELDS[name].metadata["choices"]
            if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
                value = "on" if value else "off"  # `preserve = true` in TOML
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            value = str(value)
            if choices and value not in choices:
                raise bad(
                    f"{name} = {value!r} {where}is not valid; {did_you_mean(value, choices)}"
                    f"choose one of: {', '.join(choices)}"
                )
            return value
        if origin is list:
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [str(v) for v in value]
        if origin is dict:
            if isinstance(value, Mapping):
                return dict(value)
            if isinstance(value, (list, tuple)):
                return parse_kv_list(value, name)
            raise TypeError
    except ConfigError:
        raise
    except (TypeError, ValueError):
        want = getattr(origin, "__name__", str(origin))
        raise bad(
            f"{name} = {value!r} {where}is not a valid {want}; fix the value in the config or flag"
        ) from None
    return value  # pragma: no cover - every field type is handled above


def parse_kv_list(items: Iterable[str], what: str) -> dict[str, Any]:
    """Parse ``["lr=1e-3", "betas=(0.9,0.99)"]`` into a dict of Python literals (strings as fallback)."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} entry {item!r} is not k=v; write it like weight_decay=0.01")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def config_from_mapping(values: Mapping[str, Any], where: str = "") -> TrainConfig:
    """Build a validated config from ``{key: value}`` (unknown keys raise, naming the nearest)."""
    where_txt = f"(in {where}) " if where else ""
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key, raw_key)
        if key not in FIELDS:
            raise ConfigError(
                f"unknown config key {raw_key!r} {where_txt}{_nearest(raw_key)}".replace(" ;", ";")
            )
        if key in kwargs and raw_key != key:
            raise ConfigError(f"{raw_key!r} and {key!r} {where_txt}are the same key; keep one of them")
        kwargs[key] = _coerce(key, value, where_txt)
    return TrainConfig(**kwargs).validate()


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config and flatten its tables (``[training] lr = ...`` -> ``lr``), kohya style.

    ``task_args`` and ``selector_args`` stay tables: they are the keys whose values are mappings.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {str(path)!r} does not exist; check the path given to --config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in flat:
            raise ConfigError(f"key {key!r} appears twice in {str(path)!r}; keep one")
        flat[key] = value

    for key, value in data.items():
        if isinstance(value, dict) and key not in ("task_args", "selector_args"):
            for sub_key, sub_value in value.items():
                put(sub_key, sub_value)
        else:
            put(key, value)
    return flat


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config from a TOML file (optional) with ``overrides`` (e.g. CLI flags) winning."""
    values: dict[str, Any] = read_toml(path) if path else {}
    for key, value in (overrides or {}).items():
        key = ALIASES.get(key, key)
        for alias, target in ALIASES.items():
            if target == key:
                values.pop(alias, None)
        values[key] = value
    return config_from_mapping(values, str(path) if path else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--key`` flag per config key; unset flags stay ``None`` so the TOML value stands."""
    group = parser.add_argument_group("training keys (also valid in the TOML config; flags win)")
    for name, f in FIELDS.items():
        typ = _base_type(name)
        origin = typing.get_origin(typ) or typ
        flags = [f"--{name}", *(f"--{a}" for a in f.metadata["aliases"])]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in (None, "") else "")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": help_text}
        if origin is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif origin in (list, dict):
            group.add_argument(
                *flags,
                nargs="*",
                metavar="K=V"
                if origin is dict or name == "optimizer_args"
                else "PATH"
                if name in ("base_deltas", "preserve_deltas", "rehearsal_datasets")
                else "PATTERN",
                **kw,
            )
        else:
            # Values are parsed by _coerce so that flags and TOML give the same error messages.
            group.add_argument(*flags, metavar=name.upper(), choices=f.metadata["choices"], **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave, as config overrides."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


__all__ = [
    "TrainConfig",
    "add_arguments",
    "config_from_mapping",
    "load_config",
    "overrides_from_args",
    "parse_kv_list",
    "read_toml",
]
