"""The evaluation report: base vs fine-tuned on every metric and grader, each with its sample size and a
confidence interval, and a few generations side by side; and the table `tuneforge` prints from it.

Intervals: Wilson for proportions (exact match, accuracy, JSON validity, pass/fail graders), a
percentile bootstrap over the examples otherwise: of the mean for per-example scores (ROUGE, token F1,
graded scores), of the ratio of sums for likelihood metrics (loss is summed over tokens, so an example
weighs by its tokens; perplexity's interval is exp of the loss's), and of the corpus score itself for
BLEU and chrF (the examples are resampled and the corpus scored again). Torch-free, so the CLI prints
a report without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import numpy as np

from tuneforge.evaluation.statistics import Interval, bootstrap_mean_interval, wilson_interval
from tuneforge.spec.job import LIKELIHOOD_METRICS, LOWER_IS_BETTER, EvaluationSpec
from tuneforge.spec.jobdir import EvaluationReport, MetricEstimate, ReportRow, SideBySide

RESAMPLES = 2000
CORPUS_RESAMPLES = 300  # each resample scores the whole corpus again


def build_report(spec: EvaluationSpec, *, base: dict | None, fine_tuned: dict | None, dataset: str, examples: int,
                 base_model: str | None = None, fine_tuned_model: str | None = None,
                 confidence: float = 0.95) -> EvaluationReport:
    """The report from the runner's results (evaluation/runner.py, details=True) for each model."""
    graders = {g.name for g in spec.graders}
    rows = []
    for name in spec.measured():
        kind = "likelihood" if name in LIKELIHOOD_METRICS else "grader" if name in graders else "generated"
        row = ReportRow(metric=name, kind=kind, higher_is_better=name not in LOWER_IS_BETTER,
                        base=estimate(name, base, spec, confidence) if base else None,
                        fine_tuned=estimate(name, fine_tuned, spec, confidence) if fine_tuned else None)
        if row.base is not None or row.fine_tuned is not None:
            rows.append(row)
    return EvaluationReport(dataset=dataset, examples=examples, base_model=base_model, fine_tuned_model=fine_tuned_model,
                            confidence=confidence, rows=rows, samples=side_by_side(base, fine_tuned, spec.report_samples))


def estimate(name: str, result: dict, spec: EvaluationSpec, confidence: float = 0.95) -> MetricEstimate | None:
    """One model's value of one metric with its interval, from the runner's result; None if not measured."""
    value = result.get(name)
    if value is None:
        return None
    details = result.get("details") or {}
    if name in LIKELIHOOD_METRICS:
        return _likelihood(name, value, details.get("likelihood") or {}, confidence)
    scored = (details.get("scores") or {}).get(name)
    if not scored:
        return MetricEstimate(value=value, n=0)
    per_example = scored.get("per_example") or []
    if scored.get("corpus"):
        interval = corpus_bootstrap(name, details["predictions"], details["references"], spec.metric_options(name),
                                    confidence=confidence)
    elif per_example and all(v in (0.0, 1.0) for v in per_example):
        interval = wilson_interval(int(sum(per_example)), len(per_example), confidence=confidence)
    else:
        interval = bootstrap_mean_interval(per_example, confidence=confidence, resamples=RESAMPLES)
    return _estimate(value, scored.get("n", len(per_example)), interval)


def _likelihood(name: str, value: float, likelihood: dict, confidence: float) -> MetricEstimate:
    rows = likelihood.get("per_example")
    n, tokens = likelihood.get("examples", 0), likelihood.get("tokens")
    if not rows:
        return MetricEstimate(value=value, n=n, tokens=tokens)
    loss_sums, counts, correct = (np.asarray(column, dtype=np.float64) for column in zip(*rows))
    if name == "token_accuracy":
        interval = ratio_bootstrap(correct, counts, confidence=confidence)
    else:
        interval = ratio_bootstrap(loss_sums, counts, confidence=confidence)
        if name == "perplexity":
            interval = Interval(value, math.exp(min(interval.low, 50.0)), math.exp(min(interval.high, 50.0)),
                                interval.n, confidence, "bootstrap")
    return _estimate(value, len(rows), interval, tokens=tokens)


def _estimate(value: float, n: int, interval: Interval, tokens: int | None = None) -> MetricEstimate:
    def clean(x: float) -> float | None:
        return None if x is None or math.isnan(x) else float(x)

    return MetricEstimate(value=value, n=n, low=clean(interval.low), high=clean(interval.high),
                          interval=interval.method or None, tokens=tokens)


def ratio_bootstrap(numerators: Sequence[float], denominators: Sequence[float], *, confidence: float = 0.95,
                    resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the pairs (the
    examples) with replacement: a token-weighted mean such as the loss over an example's tokens."""
    top, bottom = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    n = int(top.size)
    if n == 0 or bottom.sum() == 0:
        return Interval(math.nan, math.nan, math.nan, n, confidence, "bootstrap")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))
    sums = bottom[picks].sum(axis=1)
    ratios = top[picks].sum(axis=1)[sums > 0] / sums[sums > 0]
    alpha = 1.0 - confidence
    low, high = np.percentile(ratios, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(float(top.sum() / bottom.sum()), float(low), float(high), n, confidence, "bootstrap")


def corpus_bootstrap(name: str, predictions: list[str], references: list[str], options: dict | None, *,
                     confidence: float = 0.95, resamples: int = CORPUS_RESAMPLES, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of a corpus-level score (BLEU, chrF): resample the examples, score
    the resampled corpus again."""
    from tuneforge.evaluation.metrics import score

    n = len(predictions)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence, "bootstrap")
    rng = np.random.default_rng(seed)
    values = []
    for picks in rng.integers(0, n, size=(resamples, n)):
        values.append(score(name, [predictions[i] for i in picks], [references[i] for i in picks],
                            options=options).value)
    alpha = 1.0 - confidence
    low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Interval(score(name, predictions, references, options=options).value, float(low), float(high), n,
                    confidence, "bootstrap")


def side_by_side(base: dict | None, fine_tuned: dict | None, count: int) -> list[SideBySide]:
    """The first `count` examples: prompt, reference and each model's answer."""
    sources = [r.get("details") or {} for r in (base, fine_tuned) if r]
    first = next((s for s in sources if s.get("predictions") is not None), None)
    if first is None:
        return []
    base_answers = ((base or {}).get("details") or {}).get("predictions")
    tuned_answers = ((fine_tuned or {}).get("details") or {}).get("predictions")
    return [SideBySide(prompt=first["prompts"][i], reference=first["references"][i],
                       base=base_answers[i] if base_answers else None,
                       fine_tuned=tuned_answers[i] if tuned_answers else None)
            for i in range(min(count, len(first["predictions"])))]


# ---- the table -----------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _cell(estimate: MetricEstimate | None) -> str:
    if estimate is None:
        return "-"
    if estimate.low is None or estimate.high is None:
        return _number(estimate.value)
    return f"{_number(estimate.value)} [{_number(estimate.low)}, {_number(estimate.high)}]"


def format_report(report: EvaluationReport, *, samples: bool = True, width: int = 100) -> str:
    """The report as a plain-text table (and the side-by-side generations)."""
    both = any(r.base is not None for r in report.rows) and any(r.fine_tuned is not None for r in report.rows)
    header = ["metric", "n", "base", "fine-tuned", "change"] if both else ["metric", "n", "score"]
    lines = [header]
    for row in report.rows:
        n = (row.fine_tuned or row.base).n
        if both:
            change = row.change
            arrow = "" if change is None or change == 0 else (
                " better" if (change > 0) == row.higher_is_better else " worse")
            lines.append([row.metric, str(n), _cell(row.base), _cell(row.fine_tuned),
                          "-" if change is None else f"{'+' if change >= 0 else '-'}{_number(abs(change))}{arrow}"])
        else:
            lines.append([row.metric, str(n), _cell(row.fine_tuned or row.base)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [f"evaluation on {report.examples} examples of {report.dataset} "
            f"({report.confidence:.0%} intervals in brackets)"]
    text += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    if samples and report.samples:
        text.append("examples:")
        for index, sample in enumerate(report.samples, 1):
            text.append(f"  {index}. {_one_line(sample.prompt, width)}")
            text.append(f"     reference:  {_one_line(sample.reference, width)}")
            if sample.base is not None:
                text.append(f"     base:       {_one_line(sample.base, width)}")
            if sample.fine_tuned is not None:
                text.append(f"     fine-tuned: {_one_line(sample.fine_tuned, width)}")
    return "\n".join(text)


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."
