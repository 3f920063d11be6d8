"""One reading of how a recipe's run ended, for the supervisor and the worker alike."""

from __future__ import annotations

import pytest

from tuneforge.launch.outcome import RecipeReport, interpret


def report(*events) -> RecipeReport:
    return RecipeReport.of(events)


def status(value, **data):
    level = "error" if value == "failed" else "info"
    return {"type": "message", "level": level, "data": {"kind": "status", "status": value, **data}}


ROOT_CAUSE = "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 7)"


@pytest.mark.parametrize(("code", "events", "summary", "tail", "expected"), [
    (0, [status("running"), status("succeeded")], True, "", ("succeeded", 0)),
    (0, [status("running")], False, "", ("failed", 0)),  # exit 0 without a summary is not a success
    (1, [status("succeeded")], True, ROOT_CAUSE, ("succeeded", 0)),  # a rank died on its way out
    (75, [status("preempted")], False, "", ("preempted", 75)),
    (1, [status("preempted")], False, "", ("preempted", 75)),  # torchrun's 1 after every rank exited 75
    (2, [status("failed", error="DataError: x", retryable=False)], False, "", ("bad_input", 2)),
    (1, [status("failed", error="DataError: x", retryable=False)], False, "", ("bad_input", 2)),  # torchrun's 1
    (1, [status("failed", error="InjectedCrash: y", retryable=True)], False, "", ("failed", 1)),
    (-9, [status("running")], False, "", ("failed", -9)),
    (1, [status("running")], False, ROOT_CAUSE, ("failed", 1)),
])
def test_interpret(code, events, summary, tail, expected):
    outcome = interpret(code, report(*events), summary_written=summary, stderr_tail=tail)
    assert (outcome.status, outcome.exit_code) == expected
    assert outcome.restartable(0, 2) == (outcome.status == "failed")
    assert not outcome.restartable(2, 2)


def test_reasons_name_the_recipe_error_or_the_rank_or_the_signal():
    crash = interpret(1, report(status("failed", error="InjectedCrash: y")), summary_written=False)
    assert crash.reason == "InjectedCrash: y" and crash.reported
    killed = interpret(-9, report(), summary_written=False)
    assert killed.reason.startswith("killed by SIGKILL") and not killed.reported
    rank = interpret(1, report(status("failed", error="RuntimeError: gloo")), summary_written=False,
                     stderr_tail=ROOT_CAUSE)
    assert rank.reason == "rank 1 (local rank 1) killed by SIGKILL (the out-of-memory killer, or kill -9): RuntimeError: gloo"
    after = interpret(1, report(status("succeeded")), summary_written=True, stderr_tail=ROOT_CAUSE)
    assert after.exit_after_success.startswith("rank 1")


def test_the_report_keeps_the_last_word_and_the_last_step():
    r = report({"type": "metrics", "level": "info", "data": {"step": 3}}, status("running"),
               {"type": "metrics", "level": "info", "data": {"step": 4}})
    assert (r.status, r.last_step, r.error, r.retryable) == ("running", 4, None, True)
