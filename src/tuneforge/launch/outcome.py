"""What one run of a recipe came to, read from its exit code, its own events and its summary.

The one reading shared by `tuneforge train`'s supervisor and the scheduler's worker. The exit code
alone is not enough: torchrun exits 1 when every rank stopped with 75 after a checkpoint, or when a
rank died on its way out after the job had written its summary and output, and it turns a rank's 2
(bad input) into 1. The recipe's last status event and its failure event (`retryable`) keep the
difference. Stdlib only: the scheduler imports this and never imports torch.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tuneforge.spec.jobdir import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED

SUCCEEDED, PREEMPTED, BAD_INPUT, FAILED = "succeeded", "preempted", "bad_input", "failed"


@dataclass
class RecipeReport:
    """What a run said about itself in its events, gathered as they are read."""

    status: str | None = None  # the last status event's: running, preempted, failed, succeeded
    error: str | None = None  # the last error event's reason
    retryable: bool = True  # False when the recipe marked its failure as bad input
    last_step: int = 0  # the last optimizer step it reported

    def observe(self, event: dict) -> None:
        data = event.get("data") or {}
        if event.get("type") == "metrics":
            self.last_step = max(self.last_step, int(data.get("step") or 0))
        if data.get("kind") == "status" and data.get("status"):
            self.status = data["status"]
        if event.get("level") == "error":
            self.error = str(data.get("error") or event.get("message") or "")
            self.retryable = data.get("retryable") is not False

    @classmethod
    def of(cls, events: Iterable[dict]) -> RecipeReport:
        report = cls()
        for event in events:
            report.observe(event)
        return report


@dataclass(frozen=True)
class RecipeOutcome:
    status: Literal["succeeded", "preempted", "bad_input", "failed"]
    exit_code: int  # 0, 75, 2, or the failure's own code (negative: killed by that signal)
    reason: str = ""
    reported: bool = False  # the reason is the recipe's own (its failure event), not a guess from outside
    failed_rank: str | None = None  # 'rank 1 (local rank 1) killed by SIGKILL ...' from torchrun's report
    exit_after_success: str | None = None  # a process died after the job had succeeded: how

    def restartable(self, restarts_done: int, max_restarts: int) -> bool:
        """A crash (not bad input, not a stop request) with restarts left: run it again from its checkpoint."""
        return self.status == FAILED and restarts_done < max_restarts


def interpret(code: int, report: RecipeReport, *, summary_written: bool, stderr_tail: str = "") -> RecipeOutcome:
    """The outcome of a run that exited with `code`, having reported `report`."""
    rank = failed_rank(stderr_tail)
    if report.status == SUCCEEDED or (code == EXIT_OK and summary_written):
        # The recipe says so only after writing the summary and the output. A non-zero code then means
        # a rank died on its way out (a communication library's threads at interpreter exit): the result stands.
        after = None if code == EXIT_OK else (rank or describe_exit(code))
        return RecipeOutcome(SUCCEEDED, EXIT_OK, exit_after_success=after)
    if code == EXIT_PREEMPTED or report.status == PREEMPTED:
        return RecipeOutcome(PREEMPTED, EXIT_PREEMPTED, "stopped on request after a checkpoint")
    if code == EXIT_OK:
        return RecipeOutcome(FAILED, EXIT_OK, "the recipe exited without writing its summary")
    if code == EXIT_BAD_INPUT or not report.retryable:
        return RecipeOutcome(BAD_INPUT, EXIT_BAD_INPUT, report.error or describe_exit(code), bool(report.error), rank)
    reason = report.error or rank or describe_exit(code)
    if rank and rank not in reason:
        reason = f"{rank}: {reason}"
    return RecipeOutcome(FAILED, code, reason, report.error is not None, rank)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\).*?exitcode\s*:\s*(-?\d+)", re.S)


def failed_rank(stderr_tail: str) -> str | None:
    """'rank 1 (local rank 1) killed by SIGKILL ...' from torchrun's failure report, if there is one."""
    match = ROOT_CAUSE.search(stderr_tail or "")
    if not match:
        return None
    rank, local_rank, code = match.groups()
    return f"rank {rank} (local rank {local_rank}) {describe_exit(int(code))}"
