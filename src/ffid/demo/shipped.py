"""Demo bases shipped inside the package, so a fresh ``ffid demo`` need not pretrain for minutes.

A shipped base is ``bases/base-<key>.safetensors`` plus ``bases/base-<key>.json``: the file
:func:`ffid.demo.pretrain.load_or_pretrain` writes for the recipe whose hash is ``key``, made by
:func:`ffid.demo.ship_base.regenerate` (``python -m ffid.demo.ship_base``) through that same
function, and its info with provenance (command, ffid commit, library versions), the file's
SHA-256 and its judged quality on the base classes.

Reading one (:func:`find_shipped`) checks everything it relies on before the demo uses it: the
info's key and recipe equal the requested ones, the file's SHA-256 equals the recorded one, its
safetensors header names the same recipe and spec, and its tensors have exactly the names and
shapes the recipe's model has. When a check fails the demo says why in one line and pretrains
from the recipe as before (the shipped file is only ever read, never replaced): a damaged install
costs minutes, never a wrong base. ``--fresh`` skips the shipped base.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BASES_DIR = Path(__file__).resolve().parent / "bases"
RECIPE_META = "ffid_demo.recipe"  # safetensors metadata key holding the base's recipe (JSON)
QUALITY_SAMPLES = 32  # per prompt when the quality is recorded: the demo's own --samples default
REGENERATE = "python -m ffid.demo.ship_base"  # regenerates the shipped bases (run from a checkout)


def recipe_key(recipe: dict[str, Any]) -> str:
    """The cache key of a base recipe: BLAKE2b-64 of its sorted JSON."""
    return hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=8).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ShippedBase:
    """A verified shipped base: its file and its info (the ``.json`` beside it)."""

    path: Path
    info: dict[str, Any]


class ShippedBaseMismatch(Exception):
    """A shipped base that fails a check; the message is one line naming the check."""


def is_shipped(path: str | Path) -> bool:
    """Whether ``path`` is one of the bases shipped with ffid."""
    return Path(path).resolve().parent == BASES_DIR.resolve()


def base_origin(files: dict[str, Any]) -> str:
    """How a report's ``files`` say the base came: shipped, from the cache, or pretrained now."""
    if files.get("base_shipped"):
        return "shipped with ffid"
    return "from cache" if files["base_cached"] else "pretrained now"


def shipped_paths(key: str, bases_dir: Path | None = None) -> tuple[Path, Path]:
    """The file and info of the base shipped for recipe ``key`` (in :data:`BASES_DIR` by default)."""
    where = BASES_DIR if bases_dir is None else bases_dir
    return where / f"base-{key}.safetensors", where / f"base-{key}.json"


def find_shipped(recipe: dict[str, Any], bases_dir: Path | None = None) -> ShippedBase | None:
    """The shipped base of ``recipe``, verified; ``None`` when none is shipped for it.

    Raises :class:`ShippedBaseMismatch` (one line) when one is shipped but fails a check.
    """
    key = recipe_key(recipe)
    path, info_path = shipped_paths(key, bases_dir)
    if not path.is_file() and not info_path.is_file():
        return None
    if not (path.is_file() and info_path.is_file()):
        missing = path if not path.is_file() else info_path
        raise ShippedBaseMismatch(f"{missing.name} is missing")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise ShippedBaseMismatch(f"{info_path.name} is not readable JSON ({exc})") from None
    if info.get("key") != key or info.get("recipe") != recipe:
        raise ShippedBaseMismatch(f"{info_path.name} records another recipe than the one requested")
    if sha256_of(path) != info.get("sha256"):
        raise ShippedBaseMismatch(f"{path.name} does not have the SHA-256 its info records")
    check_file(path, recipe)
    return ShippedBase(path, info)


def check_file(path: Path, recipe: dict[str, Any]) -> None:
    """The base file's header names ``recipe`` and its spec, and its tensors have the names and
    shapes of the model that spec builds (reads the header only)."""
    from safetensors import safe_open

    from .model import ModelSpec, build_model
    from .task import SPEC_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise ShippedBaseMismatch(f"{path.name} is not a readable safetensors file ({exc})") from None
    try:
        file_recipe = json.loads(meta.get(RECIPE_META, "null"))
        file_spec = json.loads(meta.get(SPEC_KEY, "null"))
    except ValueError:
        raise ShippedBaseMismatch(f"{path.name} has unreadable ffid_demo metadata") from None
    if file_recipe != recipe:
        raise ShippedBaseMismatch(f"{path.name}'s header records another recipe than the one requested")
    if file_spec != recipe["spec"]:
        raise ShippedBaseMismatch(f"{path.name}'s header records another model spec than its recipe")
    expected = {k: tuple(v.shape) for k, v in build_model(ModelSpec(**recipe["spec"])).state_dict().items()}
    if shapes != expected:
        odd = sorted(set(shapes.items()) ^ set(expected.items()))[:1]
        raise ShippedBaseMismatch(
            f"{path.name}'s tensors are not those of its recipe's model (first difference: {odd})"
        )


def judged_quality(model: Any, cfg: Any, judge: Any, samples: int) -> dict[str, Any]:
    """How well ``model`` draws the base classes, and how little the held-out digits' own words.

    ``samples`` images per prompt from the demo's sampler (:func:`ffid.demo.evaluate.evaluate`,
    the demo's seeds, so fewer samples are the first ones of more), judged by the demo's judge:
    counts of argmax hits and of confident hits (calibrated p >= 0.8) pooled over the base
    classes, and argmax hits of ``a digit seven`` and the like for each held-out digit (a base
    that never saw those words or scans should rarely draw them).
    """
    from .data import DIGIT_WORDS, Concept
    from .evaluate import evaluate
    from .judge import CONFIDENT
    from .task import base_concepts

    base = base_concepts(cfg.held_out)
    held = [Concept(DIGIT_WORDS[d], d) for d in sorted(cfg.held_out)]
    concepts = [*base, *held]
    scores, images = evaluate("base", model, replace(cfg, samples=samples), judge, concepts)
    digits = [c.digit for c in concepts]
    proba = judge.probabilities(images.reshape(-1, *images.shape[2:])).reshape(len(concepts), samples, 10)
    confident = [int((proba[i, :, d] >= CONFIDENT).sum()) for i, d in enumerate(digits)]
    argmax = [sum(p == c.digit for p in scores.predictions[c.name]) for c in concepts]
    nb = len(base)
    return {
        "samples_per_prompt": samples,
        "sample_steps": cfg.sample_steps,
        "guidance": cfg.guidance,
        "seed": cfg.seed,
        "base_classes": {
            "n": nb * samples,
            "argmax_hits": sum(argmax[:nb]),
            "confident_hits": sum(confident[:nb]),
        },
        "held_out_words": {c.name: {"n": samples, "argmax_hits": argmax[nb + i]} for i, c in enumerate(held)},
    }


def wilson(hits: int, n: int, z: float = 3.0) -> tuple[float, float]:
    """Wilson score interval of a rate measured as ``hits`` of ``n`` (z = 3: about 99.7%)."""
    p, z2 = hits / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def binomial_floor(rate: float, n: int, tail: float = 1e-3) -> int:
    """The fewest hits out of ``n`` a rate of ``rate`` gives, except with probability <= ``tail``:
    the largest ``k`` with P(Binomial(n, rate) < k) <= ``tail``."""
    cdf, k = 0.0, 0
    while k <= n:
        p = math.comb(n, k) * rate**k * (1 - rate) ** (n - k)
        if cdf + p > tail:
            return k
        cdf += p
        k += 1
    return n
