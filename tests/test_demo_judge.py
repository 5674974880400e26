"""The strict judge (:mod:`ffid.demo.judge`): calibrated confidence on real scans, and the
bootstrap statistics (intervals, retention, differences) the stacking benchmark decides with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ffid.demo.classifier import fit_judge
from ffid.demo.data import Concept, load_digit_images
from ffid.demo.judge import (
    CONFIDENT,
    Estimate,
    bootstrap_mean,
    difference,
    hits_of,
    judge_images,
    judge_stage,
    pooled,
    retention,
)

pytest.importorskip("sklearn")


def hits(share: float, n: int) -> np.ndarray:
    """``n`` 0/1 hits of which exactly ``round(share * n)`` are 1 (in a fixed shuffled order)."""
    k = round(share * n)
    return np.random.default_rng(n).permutation(np.r_[np.ones(k), np.zeros(n - k)])


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digit_images()


@pytest.fixture(scope="module")
def judge(digits):
    return fit_judge(*digits, seed=0, calibrate=True)


def test_share_interval_contains_the_point_and_has_the_binomial_width() -> None:
    est = bootstrap_mean(hits(0.5, 400))
    assert est.value == 0.5 and est.n == 400
    assert est.contains(est.value)
    # the normal approximation: 1.96 * sqrt(0.25 / 400) = 0.049
    assert 0.04 < est.half_width < 0.06
    skewed = bootstrap_mean(hits(0.9, 100))
    assert skewed.low < 0.9 < skewed.high <= 1.0


def test_half_width_shrinks_with_more_samples() -> None:
    widths = [bootstrap_mean(hits(0.5, n)).half_width for n in (25, 100, 400, 1600)]
    assert widths == sorted(widths, reverse=True)
    # about 1/sqrt(n): four times the samples, half the width
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.25)


def test_bootstrap_is_deterministic_in_its_seed() -> None:
    x = hits(0.37, 64)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert retention(hits(0.1, 64), hits(0.8, 64), x, seed=5) == retention(
        hits(0.1, 64), hits(0.8, 64), x, seed=5
    )
    others = {bootstrap_mean(x, seed=s) for s in range(6)}
    assert len(others) > 1  # the seed is used: not a constant interval


def test_all_or_nothing_has_a_zero_width_interval() -> None:
    assert bootstrap_mean(np.ones(32)) == Estimate(1.0, 1.0, 1.0, 32)
    assert bootstrap_mean(np.zeros(32)).half_width == 0.0
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_mean([])


def test_retention_of_identical_stages_is_one() -> None:
    before, own = hits(0.05, 128), hits(0.85, 128)
    r = retention(before, own, own)
    assert r is not None and r.value == 1.0 and r.contains(1.0)
    assert r.low < 1.0 < r.high  # the stages are resampled independently


def test_retention_point_and_interval() -> None:
    before, own = np.zeros(200), np.ones(200)
    r = retention(before, own, hits(0.5, 200))
    assert r is not None and r.value == pytest.approx(0.5)
    assert r.contains(0.5) and r.low > 0.4 and r.high < 0.6
    # forgetting everything and more: after below before is negative retention
    low = retention(hits(0.2, 200), own, np.zeros(200))
    assert low is not None and low.value == pytest.approx(-0.25)


def test_retention_without_a_gain_is_undefined() -> None:
    assert retention(hits(0.5, 50), hits(0.5, 50), hits(0.9, 50)) is None
    assert retention(hits(0.6, 50), hits(0.4, 50), hits(0.4, 50)) is None


def test_retention_with_a_gain_lost_in_the_noise_is_unbounded() -> None:
    # 1 of 10 before, 2 of 10 after its own run: many resamples show no gain at all
    r = retention(hits(0.1, 10), hits(0.2, 10), hits(0.2, 10))
    assert r is not None and r.value == pytest.approx(1.0)
    assert r.low == -math.inf and r.high == math.inf
    assert r.to_dict() == {"value": 1.0, "low": None, "high": None, "n": 10}


def test_difference_says_which_gaps_exceed_their_noise() -> None:
    same = difference(hits(0.6, 100), hits(0.6, 100))
    assert same.value == 0.0 and same.contains(0.0)
    gap = difference(hits(0.9, 100), hits(0.5, 100))
    assert gap.value == pytest.approx(0.4) and gap.low > 0


def test_calibrated_judge_keeps_the_argmax_and_is_sure_of_real_scans(digits, judge) -> None:
    images = digits[0]
    plain = fit_judge(*digits, seed=0)
    assert torch.equal(plain.predict(images[:200]), judge.predict(images[:200]))
    assert judge.holdout_accuracy == plain.holdout_accuracy
    assert judge.holdout_confident is not None and judge.holdout_confident > 0.9
    p = judge.probabilities(images[:50])
    assert p.shape == (50, 10) and np.allclose(p.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="without calibration"):
        plain.probabilities(images[:2])
    # deterministic: a second fit gives the same probabilities
    again = fit_judge(*digits, seed=0, calibrate=True)
    assert np.array_equal(again.probabilities(images[:50]), p)


def test_confident_accuracy_is_stricter_than_argmax(digits, judge) -> None:
    images, labels = digits
    sevens = judge_images(judge, images[labels == 7][:64], 7)
    assert sevens.argmax.value > 0.95 and sevens.confident.value > 0.85
    assert sevens.confident.n == 64 and sevens.threshold == CONFIDENT
    # a blend of a 7 and a 1 is still often "a 7" by argmax, rarely a confident one
    blend = 0.5 * images[labels == 7][:64] + 0.5 * images[labels == 1][:64]
    mixed = judge_images(judge, blend, 7)
    assert mixed.confident.value <= mixed.argmax.value
    assert mixed.confident.value < sevens.confident.value - 0.3
    noise = torch.rand(64, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge_images(judge, noise, 7).confident.value < 0.2
    d = sevens.to_dict()
    assert len(d["p_intended"]) == 64 and d["confident"]["value"] == sevens.confident.value
    # the JSON form gives back the same hits, so the report can recompute from it alone
    assert np.array_equal(hits_of(d), sevens.confident_hits)
    assert np.array_equal(hits_of(d, "argmax"), sevens.argmax_hits)
    assert json.loads(json.dumps(d)) == d


def test_judge_stage_and_pooled_base_classes(digits, judge) -> None:
    images, labels = digits
    concepts = [Concept("zero", 0), Concept("three", 3)]
    rows = torch.stack([images[labels == 0][:20], images[labels == 5][:20]])
    v = judge_stage(judge, rows, concepts)
    assert set(v) == {"zero", "three"}
    assert v["zero"].argmax.value > 0.9 and v["three"].argmax.value < 0.2  # fives are not threes
    both = pooled(list(v.values()), "argmax")
    assert both.value == pytest.approx((v["zero"].argmax.value + v["three"].argmax.value) / 2)
    with pytest.raises(ValueError, match="concepts"):
        judge_stage(judge, rows[:1], concepts)
