"""The evaluation report: each metric's value with its sample size and interval, and the printed table."""

import math

import pytest

from tuneforge.evaluation.report import build_report, format_report, ratio_bootstrap
from tuneforge.evaluation.statistics import bootstrap_mean_interval, wilson_interval
from tuneforge.spec.job import EvaluationSpec
from tuneforge.spec.jobdir import EvaluationReport


def result(loss_rows, exact, f1, predictions):
    """A runner result (evaluation/runner.py, details=True) built by hand."""
    loss = sum(r[0] for r in loss_rows) / sum(r[1] for r in loss_rows)
    return {
        "loss": loss, "token_accuracy": sum(r[2] for r in loss_rows) / sum(r[1] for r in loss_rows),
        "perplexity": math.exp(loss), "exact_match": sum(exact) / len(exact), "token_f1": sum(f1) / len(f1),
        "details": {
            "likelihood": {"examples": len(loss_rows), "tokens": sum(r[1] for r in loss_rows), "per_example": loss_rows},
            "scores": {"exact_match": {"value": sum(exact) / len(exact), "n": len(exact), "per_example": exact,
                                       "corpus": False},
                       "token_f1": {"value": sum(f1) / len(f1), "n": len(f1), "per_example": f1, "corpus": False}},
            "predictions": predictions, "references": ["r1", "r2", "r3", "r4"], "prompts": ["p1", "p2", "p3", "p4"],
        },
    }


SPEC = EvaluationSpec(metrics=["loss", "perplexity", "exact_match", "token_f1"], report_samples=2)
BASE = result([[8.0, 4, 1], [12.0, 6, 2], [3.0, 2, 0], [9.0, 4, 1]], [0.0, 0.0, 1.0, 0.0], [0.2, 0.5, 1.0, 0.1],
              ["b1", "b2", "b3", "b4"])
TUNED = result([[2.0, 4, 3], [1.5, 6, 5], [0.5, 2, 2], [1.0, 4, 3]], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.4],
               ["t1", "t2", "t3", "t4"])


def test_each_metric_has_its_sample_size_and_the_interval_its_kind_calls_for():
    report = build_report(SPEC, base=BASE, fine_tuned=TUNED, dataset="val.jsonl", examples=4)
    rows = {row.metric: row for row in report.rows}
    assert list(rows) == ["loss", "token_accuracy", "perplexity", "exact_match", "token_f1"]

    # exact match is a proportion: Wilson.
    em = rows["exact_match"].fine_tuned
    expected = wilson_interval(3, 4)
    assert (em.value, em.n, em.interval) == (0.75, 4, "wilson")
    assert (em.low, em.high) == pytest.approx((expected.low, expected.high))
    # token F1 is a mean of per-example scores: bootstrap of the mean.
    f1 = rows["token_f1"].base
    expected = bootstrap_mean_interval([0.2, 0.5, 1.0, 0.1], resamples=2000)
    assert f1.interval == "bootstrap" and (f1.low, f1.high) == pytest.approx((expected.low, expected.high))
    # loss is token-weighted: a bootstrap of the ratio of sums; perplexity's interval is exp of the loss's.
    loss, ppl = rows["loss"].base, rows["perplexity"].base
    assert loss.value == pytest.approx(32.0 / 16) and loss.n == 4 and loss.tokens == 16
    interval = ratio_bootstrap([8.0, 12.0, 3.0, 9.0], [4, 6, 2, 4])
    assert (loss.low, loss.high) == pytest.approx((interval.low, interval.high))
    assert loss.low <= loss.value <= loss.high
    assert (ppl.low, ppl.high) == pytest.approx((math.exp(loss.low), math.exp(loss.high)))
    assert rows["loss"].higher_is_better is False and rows["exact_match"].higher_is_better is True
    assert rows["exact_match"].change == pytest.approx(0.5)
    # The report is what DIR/evaluation.json holds.
    assert EvaluationReport.model_validate_json(report.model_dump_json()) == report


def test_ratio_bootstrap_of_equal_ratios_is_that_ratio():
    interval = ratio_bootstrap([2.0, 4.0, 6.0], [1, 2, 3])
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((2.0, 2.0, 2.0))


def test_the_table_shows_base_and_fine_tuned_side_by_side_with_the_direction_of_the_change():
    report = build_report(SPEC, base=BASE, fine_tuned=TUNED, dataset="val.jsonl", examples=4)
    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith("evaluation on 4 examples of val.jsonl")
    header = lines[1].split()
    assert header == ["metric", "n", "base", "fine-tuned", "change"]
    loss_line = next(line for line in lines if line.strip().startswith("loss"))
    assert "2.0000 [" in loss_line and "better" in loss_line  # the loss went down: better
    em_line = next(line for line in lines if line.strip().startswith("exact_match"))
    assert "+0.5000 better" in em_line and " 4 " in em_line
    # Two examples side by side (report_samples=2).
    assert "  1. p1" in text and "     base:       b1" in text and "     fine-tuned: t2" in text
    assert "3. p3" not in text


def test_a_lone_model_gets_one_score_column():
    report = build_report(SPEC, base=BASE, fine_tuned=None, dataset="val.jsonl", examples=4)
    lines = format_report(report, samples=False).splitlines()
    assert lines[1].split() == ["metric", "n", "score"] and len(lines) == 2 + 5


def test_corpus_bleu_interval_rescores_resampled_corpora():
    pytest.importorskip("sacrebleu")
    from tuneforge.evaluation.metrics import score

    predictions = ["the cat sat on the mat", "a dog ran", "hello there world", "it is raining today"]
    references = ["the cat sat on a mat", "a dog ran away", "hello world", "it is raining"]
    bleu = score("bleu", predictions, references)
    tuned = {"bleu": bleu.value, "details": {"scores": {"bleu": {"value": bleu.value, "n": 4, "corpus": True,
                                                               "per_example": bleu.per_example}},
                                             "predictions": predictions, "references": references, "prompts": ["p"] * 4}}
    row = build_report(EvaluationSpec(metrics=["bleu"]), base=None, fine_tuned=tuned, dataset="d", examples=4).rows[0]
    assert row.fine_tuned.interval == "bootstrap" and row.fine_tuned.low <= bleu.value <= row.fine_tuned.high
