"""How the supervisor reads a child's end: torchrun's failure report, and the recipe's own last status."""

from __future__ import annotations

import sys
import textwrap

from tuneforge.engine.events import read_events
from tuneforge.launch.supervisor import failed_rank, supervise

TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
tuneforge.recipes.sft FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 101)  (SIGTERM)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_22:06:29
  host      : node-3
  rank      : 5 (local_rank: 1)
  exitcode  : -9 (pid: 102)  (SIGKILL)
  error_file: <N/A>
============================================================
"""


def test_the_root_cause_rank_is_named_not_the_ranks_torchrun_stopped():
    assert failed_rank(TORCHRUN_REPORT).startswith("rank 5 (local rank 1) killed by SIGKILL")
    assert failed_rank("Traceback (most recent call last): ...") is None


def child(tmp_path, status: str, code: int) -> list[str]:
    """A stand-in recipe that reports a status the way the recipe does, then exits with code."""
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from tuneforge.engine.events import EventReporter
        EventReporter(sys.argv[1]).emit("status", kind="status", status={status!r})
        sys.stderr.write({TORCHRUN_REPORT!r})
        sys.exit({code})
    """))
    return [sys.executable, str(script), str(tmp_path)]


def test_a_rank_dying_after_the_job_succeeded_does_not_fail_it(tmp_path, capfd):
    outcome = supervise(tmp_path, child(tmp_path, "succeeded", 1), max_restarts=2)
    assert outcome.status == "succeeded" and not outcome.attempts
    warning = [e for e in read_events(tmp_path) if e["data"].get("kind") == "exit_after_success"]
    assert warning and "rank 5" in warning[0]["message"]
    assert "Root Cause" in capfd.readouterr().err  # the child's stderr still reaches the terminal


def test_every_rank_preempted_is_a_preemption_whatever_torchrun_exits_with(tmp_path):
    outcome = supervise(tmp_path, child(tmp_path, "preempted", 1), max_restarts=2)
    assert outcome.status == "preempted" and outcome.exit_code == 75


def test_a_failed_rank_is_restarted_then_reported_by_name(tmp_path):
    outcome = supervise(tmp_path, child(tmp_path, "running", 1), max_restarts=1)
    assert outcome.status == "failed" and len(outcome.attempts) == 2
    assert "rank 5 (local rank 1) killed by SIGKILL" in outcome.reason
    assert [e["data"]["kind"] for e in read_events(tmp_path)].count("rank_failed") == 2
