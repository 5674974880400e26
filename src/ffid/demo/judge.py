"""The strict judge: argmax and *confident* accuracy of generated samples, with bootstrap intervals.

An SVM's argmax calls every blob some digit, so a prompt whose samples are barely recognisable
can still score well, and with a few dozen samples one sample moves a score by several points.
Here each set of samples gets two scores, each with a 95% bootstrap interval:

- *argmax accuracy*: the share the (uncalibrated) SVM classifies as the intended digit, the
  demo's historical score;
- *confident accuracy*: the share whose calibrated probability of the intended digit is at least
  :data:`CONFIDENT` (0.8).

*Retention* ("share of the gain kept") compares three stages of one prompt, ``(after - before) /
(own - before)``, on confident accuracy, with an interval from resampling each stage's samples
independently. Every random draw comes from a ``numpy`` generator seeded by the caller, so the
same samples always give the same intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .classifier import DigitJudge
from .data import Concept

CONFIDENT = 0.8  # p(intended digit) at which a sample counts as clearly that digit
RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A point value with a bootstrap interval ``[low, high]`` over ``n`` samples (per stage)."""

    value: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def to_dict(self) -> dict[str, float | int | None]:
        # JSON has no infinity: an unbounded end (retention whose gain may vanish) is null
        def finite(x: float) -> float | None:
            return round(x, 6) if np.isfinite(x) else None

        return {"value": finite(self.value), "low": finite(self.low), "high": finite(self.high), "n": self.n}


def _interval(stats: np.ndarray, undefined: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of bootstrap statistics; an undefined resample counts against both ends.

    ``lower``/``higher`` quantiles (no interpolation) keep the interval on resampled values and
    make it slightly conservative; an undefined value is -inf for the low end and +inf for the
    high end, so if more than ``(1 - level) / 2`` of the resamples are undefined the interval is
    unbounded rather than quietly narrowed.
    """
    tail = (1 - level) / 2
    low = np.quantile(np.where(undefined, -np.inf, stats), tail, method="lower")
    high = np.quantile(np.where(undefined, np.inf, stats), 1 - tail, method="higher")
    return float(low), float(high)


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of ``resamples`` resamples (with replacement, same size) of ``values``."""
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def _as_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if out.size == 0:
        raise ValueError("no samples to judge")
    return out


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Estimate:
    """The mean of ``values`` (e.g. 0/1 hits: a share) with a percentile bootstrap interval."""
    v = _as_values(values)
    stats = _resampled_means(v, np.random.default_rng(seed), resamples)
    low, high = _interval(stats, np.zeros(resamples, dtype=bool), level)
    return Estimate(float(v.mean()), low, high, len(v))


def difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Estimate:
    """``mean(a) - mean(b)`` with an interval from resampling ``a`` and ``b`` independently; a
    difference is larger than its noise when the interval excludes 0."""
    va, vb = _as_values(a), _as_values(b)
    rng = np.random.default_rng(seed)
    stats = _resampled_means(va, rng, resamples) - _resampled_means(vb, rng, resamples)
    low, high = _interval(stats, np.zeros(resamples, dtype=bool), level)
    return Estimate(float(va.mean() - vb.mean()), low, high, min(len(va), len(vb)))


def retention(
    before: Sequence[float] | np.ndarray,
    own: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Estimate | None:
    """Share of a prompt's gain kept: ``(after - before) / (own - before)`` of the stage means.

    ``before``, ``own`` and ``after`` are one prompt's per-sample hits at three stages (before its
    training, after its own run, after later runs). Each stage is resampled independently. None
    when the point gain ``own - before`` is not positive (nothing was learned, so nothing can be
    kept); a resample whose gain is not positive is undefined (see :func:`_interval`).
    """
    vb, vo, va = (_as_values(x) for x in (before, own, after))
    gain = vo.mean() - vb.mean()
    if gain <= 0:
        return None
    rng = np.random.default_rng(seed)
    mb, mo, ma = (_resampled_means(v, rng, resamples) for v in (vb, vo, va))
    gains = mo - mb
    undefined = gains <= 0
    stats = np.where(undefined, 0.0, (ma - mb) / np.where(undefined, 1.0, gains))
    low, high = _interval(stats, undefined, level)
    return Estimate(float((va.mean() - vb.mean()) / gain), low, high, min(len(vb), len(vo), len(va)))


@dataclass(frozen=True)
class Verdict:
    """The strict judge on one set of samples meant to show ``digit``."""

    digit: int
    p_intended: np.ndarray  # calibrated p(digit) per sample
    predicted: np.ndarray  # the SVM's argmax digit per sample
    argmax: Estimate
    confident: Estimate
    threshold: float

    @property
    def argmax_hits(self) -> np.ndarray:
        return (self.predicted == self.digit).astype(np.float64)

    @property
    def confident_hits(self) -> np.ndarray:
        return (self.p_intended >= self.threshold).astype(np.float64)

    @property
    def mean_p(self) -> float:
        return float(self.p_intended.mean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "digit": self.digit,
            "argmax": self.argmax.to_dict(),
            "confident": self.confident.to_dict(),
            "mean_p": round(self.mean_p, 6),
            "threshold": self.threshold,
            # per sample, so retention and differences can be recomputed from the JSON alone: the
            # hits as 0/1 strings (a rounded probability could land on the other side of the threshold)
            "hits": {"argmax": _bits(self.argmax_hits), "confident": _bits(self.confident_hits)},
            "p_intended": [round(float(x), 4) for x in self.p_intended],
            "predicted": [int(x) for x in self.predicted],
        }


def _bits(hits: np.ndarray) -> str:
    return "".join("1" if h else "0" for h in hits)


def hits_of(verdict: dict[str, Any], measure: str = "confident") -> np.ndarray:
    """Per-sample 0/1 hits of a :meth:`Verdict.to_dict` (``measure``: confident or argmax)."""
    if measure not in ("confident", "argmax"):
        raise ValueError(f"measure {measure!r} is not 'confident' or 'argmax'")
    return np.array([c == "1" for c in verdict["hits"][measure]], dtype=np.float64)


def judge_images(
    judge: DigitJudge,
    images: torch.Tensor,
    digit: int,
    threshold: float = CONFIDENT,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> Verdict:
    """Argmax and confident accuracy of ``images`` (model space) meant to show ``digit``.

    ``judge`` must be fitted with ``calibrate=True``.
    """
    if not 0 <= digit <= 9:
        raise ValueError(f"digit {digit} is not 0..9")
    p = judge.probabilities(images)[:, digit]
    predicted = judge.predict(images).numpy()
    argmax = bootstrap_mean(predicted == digit, resamples, seed, level)
    confident = bootstrap_mean(p >= threshold, resamples, seed, level)
    return Verdict(digit, p, predicted, argmax, confident, threshold)


def judge_stage(
    judge: DigitJudge, images: torch.Tensor, concepts: Sequence[Concept], **kwargs: Any
) -> dict[str, Verdict]:
    """One :class:`Verdict` per concept from ``images`` shaped ``[len(concepts), samples, ...]``
    (what :func:`ffid.demo.evaluate.evaluate` returns); ``kwargs`` go to :func:`judge_images`."""
    if images.shape[0] != len(concepts):
        raise ValueError(f"{images.shape[0]} image rows for {len(concepts)} concepts")
    return {c.name: judge_images(judge, images[i], c.digit, **kwargs) for i, c in enumerate(concepts)}


def pooled(
    verdicts: Sequence[Verdict], measure: str = "confident", resamples: int = RESAMPLES, seed: int = 0
) -> Estimate:
    """One estimate over several prompts' samples together (e.g. the base classes): with the same
    number of samples per prompt, the pooled share is the mean of the prompts' shares."""
    if measure not in ("confident", "argmax"):
        raise ValueError(f"measure {measure!r} is not 'confident' or 'argmax'")
    hits = np.concatenate([getattr(v, f"{measure}_hits") for v in verdicts])
    return bootstrap_mean(hits, resamples, seed)
