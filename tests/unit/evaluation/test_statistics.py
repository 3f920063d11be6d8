"""Intervals and kappas against values computed by hand (and the reference libraries when installed)."""

import math

import numpy as np
import pytest

from tuneforge.evaluation.statistics import (
    bootstrap_mean_interval,
    cohen_kappa,
    fleiss_kappa,
    fleiss_table,
    percent_agreement,
    wilson_interval,
    win_tie_loss,
)

# Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters each, 5 categories. P_bar = 0.378,
# P_e = 0.213, kappa = 0.210.
FLEISS_EXAMPLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_wilson_interval_matches_the_formula_by_hand():
    # 8 of 10 at 95%: z = 1.959964, z^2 = 3.841459; centre = (0.8 + 0.192073) / 1.384146 = 0.716741,
    # half = 1.959964 / 1.384146 * sqrt(0.016 + 0.009604) = 1.416011 * 0.160011 = 0.226578.
    interval = wilson_interval(8, 10)
    assert interval.estimate == 0.8
    assert interval.low == pytest.approx(0.490162, abs=2e-6)
    assert interval.high == pytest.approx(0.943318, abs=2e-6)
    # 0 of 10: the interval does not collapse to a point (Wald's would be [0, 0]); high = z^2/n / (1 + z^2/n).
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and zero.high == pytest.approx(0.384146 / 1.384146, abs=1e-6)
    # Symmetric: the interval for failures mirrors the one for successes.
    assert wilson_interval(2, 10).low == pytest.approx(1 - interval.high)
    # A wider confidence gives a wider interval.
    assert wilson_interval(8, 10, confidence=0.99).low < interval.low


def test_wilson_interval_without_data_is_uninformative():
    empty = wilson_interval(0, 0)
    assert math.isnan(empty.estimate) and (empty.low, empty.high) == (0.0, 1.0)
    assert empty.to_dict()["estimate"] is None
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_win_tie_loss_rates_each_have_an_interval():
    result = win_tie_loss(6, 3, 1)
    assert result.n == 10
    assert (result.win.estimate, result.tie.estimate, result.loss.estimate) == (0.6, 0.3, 0.1)
    assert result.win.low < 0.6 < result.win.high
    assert result.to_dict()["win_rate"]["n"] == 10


def test_bootstrap_interval_by_hand_and_reproducible():
    # Two values 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1.
    interval = bootstrap_mean_interval([0.0, 1.0], resamples=4000, seed=1)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    constant = bootstrap_mean_interval([3.0] * 7)
    assert (constant.low, constant.high) == (3.0, 3.0)

    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    first = bootstrap_mean_interval(values, seed=5)
    assert first == bootstrap_mean_interval(values, seed=5)
    assert first != bootstrap_mean_interval(values, seed=6)
    # For a mean of 400 draws the percentile interval is close to mean -/+ 1.96 s / sqrt(n).
    half = 1.96 * values.std(ddof=1) / 20
    assert first.low < values.mean() < first.high
    assert (first.high - first.low) / 2 == pytest.approx(half, rel=0.1)
    assert math.isnan(bootstrap_mean_interval([]).estimate)


def test_bootstrap_blocks_give_the_same_interval(monkeypatch):
    import tuneforge.evaluation.statistics as statistics

    values = list(range(50))
    whole = bootstrap_mean_interval(values, resamples=500, seed=3)
    monkeypatch.setattr(statistics, "_BOOTSTRAP_BLOCK", 50 * 7)  # 7 resamples per block
    assert bootstrap_mean_interval(values, resamples=500, seed=3) == whole


def test_cohen_kappa_by_hand():
    # Wikipedia's example: 50 proposals, both yes 20, A yes / B no 5, A no / B yes 10, both no 15.
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = 0.2 / 0.5 = 0.4.
    first = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    # Three labels: p_o = 5/6; marginals first (l 3, r 2, t 1), second (l 2, r 3, t 1):
    # p_e = (6 + 6 + 1) / 36 = 13/36; kappa = (30/36 - 13/36) / (23/36) = 17/23.
    a = ["left", "left", "left", "right", "right", "tie"]
    b = ["left", "left", "right", "right", "right", "tie"]
    assert cohen_kappa(a, b) == pytest.approx(17 / 23)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["tie"] * 4, ["tie"] * 4))  # p_e = 1: undefined
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(a, b[:3])


def test_fleiss_kappa_by_hand():
    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(0.20993, abs=1e-5)
    # 3 subjects, 3 raters, 2 categories [[3,0],[0,3],[2,1]]: P_i = 1, 1, 1/3 -> P_bar = 7/9;
    # p = (5/9, 4/9) -> P_e = 41/81; kappa = (63 - 41) / (81 - 41) = 0.55.
    assert fleiss_kappa([[3, 0], [0, 3], [2, 1]]) == pytest.approx(0.55)
    ratings = [["l", "l", "l"], ["r", "r", "r"], ["l", "l", "r"]]
    assert fleiss_table(ratings, categories=["l", "r"]) == [[3, 0], [0, 3], [2, 1]]
    with pytest.raises(ValueError, match="same number of ratings"):
        fleiss_kappa([[2, 0], [1, 2]])
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))


def test_percent_agreement_counts_rater_pairs():
    # Subject 1: 3 pairs agree; subject 2: of 3 pairs one agrees -> 4 / 6.
    assert percent_agreement([["a", "a", "a"], ["a", "b", "b"]]) == pytest.approx(4 / 6)


def test_cohen_kappa_equals_scikit_learn_when_installed():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    a = ["left", "left", "left", "right", "right", "tie", "tie", "left"]
    b = ["left", "right", "left", "right", "tie", "tie", "left", "left"]
    assert cohen_kappa(a, b) == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b))


def test_fleiss_kappa_equals_statsmodels_when_installed():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater")
    assert fleiss_kappa(FLEISS_EXAMPLE) == pytest.approx(inter_rater.fleiss_kappa(np.array(FLEISS_EXAMPLE)))


def test_wilson_interval_equals_statsmodels_when_installed():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for successes, n, confidence in [(8, 10, 0.95), (0, 10, 0.95), (10, 10, 0.95), (37, 120, 0.99), (1, 3, 0.9)]:
        low, high = proportion.proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
        ours = wilson_interval(successes, n, confidence=confidence)
        assert (ours.low, ours.high) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
