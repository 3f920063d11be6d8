"""Confidence intervals and agreement statistics for judged evaluations (torch-free, numpy only).

Win rates from LLM judges and human annotators are proportions over a few hundred pairs at most, so each
comes with an interval; agreement between annotators (or a judge and itself) is chance-corrected kappa.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

# Bootstrap resamples are drawn in blocks of at most this many indices, so memory stays bounded.
_BOOTSTRAP_BLOCK = 1 << 22


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval; estimate is nan when there was no data (n = 0)."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    method: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: nan (no data) becomes null."""
        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high), "n": self.n,
                "confidence": self.confidence, "method": self.method}


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion p = successes / n.

        centre    = (p + z^2 / 2n) / (1 + z^2 / n)
        halfwidth = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    with z the standard normal quantile at 1 - (1 - confidence) / 2. Unlike the normal (Wald) interval it
    stays inside [0, 1] and does not collapse to a point at p = 0 or 1, which matters for small n.
    n = 0 gives estimate nan and the uninformative interval [0, 1].
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return Interval(math.nan, 0.0, 1.0, 0, confidence, "wilson")
    z = _z(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n))
    # At p = 0 (or 1) the bound is exactly 0 (or 1); rounding would leave 1e-17.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high, n, confidence, "wilson")


def bootstrap_mean_interval(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                            seed: int = 0) -> Interval:
    """Percentile bootstrap interval for the mean of values.

    Draw `resamples` samples of size n with replacement (numpy's default_rng(seed), so the interval is
    reproducible), take each sample's mean, and report the (alpha/2, 1 - alpha/2) percentiles of those
    means, alpha = 1 - confidence. No data gives estimate nan and an interval of nan.
    """
    _z(confidence)
    data = np.asarray(values, dtype=np.float64)
    n = int(data.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, "bootstrap")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    per_block = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, resamples, per_block):
        count = min(per_block, resamples - start)
        means[start : start + count] = data[rng.integers(0, n, size=(count, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(float(data.mean()), float(low), float(high), n, confidence, "bootstrap")


@dataclass(frozen=True)
class WinTieLoss:
    """Counts of one side's outcomes against another, each rate with its Wilson interval."""

    wins: int
    ties: int
    losses: int
    win: Interval
    tie: Interval
    loss: Interval

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n,
                "win_rate": self.win.to_dict(), "tie_rate": self.tie.to_dict(), "loss_rate": self.loss.to_dict()}


def win_tie_loss(wins: int, ties: int, losses: int, *, confidence: float = 0.95) -> WinTieLoss:
    """Win, tie and loss rates over n = wins + ties + losses, each with a Wilson interval."""
    n = wins + ties + losses
    return WinTieLoss(wins, ties, losses, wilson_interval(wins, n, confidence=confidence),
                      wilson_interval(ties, n, confidence=confidence), wilson_interval(losses, n, confidence=confidence))


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float:
    """Cohen's kappa between two annotators who labelled the same items.

        kappa = (p_o - p_e) / (1 - p_e)

    p_o: the fraction of items both gave the same label; p_e = sum over labels k of p1(k) * p2(k), the
    agreement expected by chance from each annotator's own label frequencies. 1 is perfect agreement,
    0 chance level, below 0 worse than chance. When p_e = 1 (both always used one and the same label)
    kappa is undefined and nan is returned, as scikit-learn does.
    """
    if len(first) != len(second):
        raise ValueError(f"both annotators must label the same items: {len(first)} and {len(second)} labels")
    n = len(first)
    if n == 0:
        return math.nan
    observed = sum(a == b for a, b in zip(first, second)) / n
    labels = set(first) | set(second)
    expected = sum((list(first).count(k) / n) * (list(second).count(k) / n) for k in labels)
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1.0 - expected)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa from a subjects x categories table of counts (how many raters put subject i in category j).

    With N subjects, n raters per subject (every row must sum to the same n >= 2) and n_ij the counts:

        P_i   = (sum_j n_ij^2 - n) / (n (n - 1))      agreement on subject i
        P_bar = mean_i P_i
        p_j   = sum_i n_ij / (N n)                     share of all ratings in category j
        P_e   = sum_j p_j^2
        kappa = (P_bar - P_e) / (1 - P_e)

    The raters need not be the same people on every subject, only as many. nan when P_e = 1 (every rating
    in one category), as statsmodels does.
    """
    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError("fleiss_kappa needs a non-empty subjects x categories table")
    if (counts < 0).any():
        raise ValueError("fleiss_kappa counts must be non-negative")
    per_subject = counts.sum(axis=1)
    raters = per_subject[0]
    if not np.all(per_subject == raters):
        raise ValueError(f"every subject needs the same number of ratings; found {sorted(set(per_subject.astype(int)))}")
    if raters < 2:
        raise ValueError("fleiss_kappa needs at least two ratings per subject")
    subjects = counts.shape[0]
    agreement = ((counts * counts).sum(axis=1) - raters) / (raters * (raters - 1))
    p_bar = float(agreement.mean())
    shares = counts.sum(axis=0) / (subjects * raters)
    p_e = float((shares * shares).sum())
    if math.isclose(p_e, 1.0):
        return math.nan
    return (p_bar - p_e) / (1.0 - p_e)


def fleiss_table(ratings: Sequence[Sequence[Hashable]], categories: Sequence[Hashable] | None = None) -> list[list[int]]:
    """The counts table fleiss_kappa takes, from each subject's list of labels (one label per rater)."""
    if categories is None:
        categories = sorted({label for labels in ratings for label in labels}, key=str)
    index = {category: j for j, category in enumerate(categories)}
    table = []
    for labels in ratings:
        row = [0] * len(categories)
        for label in labels:
            if label not in index:
                raise ValueError(f"label {label!r} is not one of the categories {list(categories)}")
            row[index[label]] += 1
        table.append(row)
    return table


def percent_agreement(ratings: Sequence[Sequence[Hashable]]) -> float:
    """The share of rater pairs, over all subjects, who gave the same label (no chance correction)."""
    agreeing = pairs = 0
    for labels in ratings:
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                pairs += 1
                agreeing += labels[i] == labels[j]
    return agreeing / pairs if pairs else math.nan
