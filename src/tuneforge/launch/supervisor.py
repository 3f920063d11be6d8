"""Run a recipe in a child process and restart it from its last checkpoint when it dies.

A child that exits 0 succeeded; 75 was preempted after a checkpoint (resumable, not restarted here:
the machine is going away); 2 had bad input (retrying cannot help). Anything else (a crash, SIGKILL
from the out-of-memory killer, a lost node) is restarted up to max_restarts times; the recipe resumes
from the newest verified checkpoint by itself; max_restarts bounds the attempts, so a crash that repeats
at the same step is not retried forever. Stdlib only (no torch): the scheduler can use it too.

Under torchrun the child is torchrun itself: when one rank dies it stops the others and exits 1,
naming the first failure ("Root Cause ... rank: 1 ... exitcode: -9"). The supervisor keeps the tail
of the child's stderr (while passing it through) to report which rank died and how; what a run came to
is read by launch/outcome.py, the same reading the scheduler's worker uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.engine.events import EventReporter, read_events
from tuneforge.launch.commands import RESTART_VARIABLE, recipe_environment
from tuneforge.launch.outcome import (
    BAD_INPUT,
    PREEMPTED,
    SUCCEEDED,
    RecipeReport,
    describe_exit,
    failed_rank,
    interpret,
)
from tuneforge.spec.jobdir import EXIT_OK, SUMMARY_FILE

__all__ = ["Attempt", "Outcome", "describe_exit", "failed_rank", "supervise"]


@dataclass
class Attempt:
    exit_code: int
    last_step: int  # last optimizer step the attempt reported (0: none)
    reason: str


@dataclass
class Outcome:
    status: str  # succeeded, preempted, failed
    exit_code: int
    reason: str = ""
    attempts: list[Attempt] = field(default_factory=list)


def _run_teeing(command: list[str], env: dict[str, str], on_start) -> tuple[int, str]:
    """Run command, passing its stderr through as it comes (progress bars redraw with \\r, not
    newlines) while keeping the last 64 KiB; returns (exit code, that tail)."""
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    on_start(child)
    tail = bytearray()
    out = getattr(sys.stderr, "buffer", None)

    def pump():
        while chunk := os.read(child.stderr.fileno(), 65536):
            tail.extend(chunk)
            del tail[: max(0, len(tail) - 65536)]
            if out is not None:
                out.write(chunk)
                out.flush()
            else:
                sys.stderr.write(chunk.decode(errors="replace"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = child.wait()
    reader.join(timeout=10)
    return code, tail.decode(errors="replace")


def supervise(job_dir: Path, command: list[str], *, max_restarts: int, env: dict[str, str] | None = None) -> Outcome:
    """Run command until it succeeds, is preempted, has bad input, or runs out of restarts."""
    events = EventReporter(job_dir)
    attempts: list[Attempt] = []
    interrupts = 0

    child = None

    def forward(signum, _frame):
        # The child handles the first signal gracefully (checkpoint, exit 75); a second one stops it at once.
        nonlocal interrupts
        interrupts += 1
        if child is not None and child.poll() is None and signum == signal.SIGTERM:
            child.send_signal(signum)  # a SIGINT from the terminal already reached the whole process group

    def started(process):
        nonlocal child
        child = process

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            events_before = sum(1 for _ in read_events(job_dir))
            run_env = {**os.environ, **recipe_environment({**(env or {}), RESTART_VARIABLE: str(len(attempts))})}
            code, stderr_tail = _run_teeing(command, run_env, started)
            report = RecipeReport.of(e for i, e in enumerate(read_events(job_dir)) if i >= events_before)
            outcome = interpret(code, report, summary_written=(job_dir / SUMMARY_FILE).exists(), stderr_tail=stderr_tail)
            if outcome.status == SUCCEEDED:
                if outcome.exit_after_success:
                    events.emit(f"the job succeeded, then a process exited abnormally: {outcome.exit_after_success}",
                                level="warning", kind="exit_after_success")
                return Outcome(SUCCEEDED, EXIT_OK, attempts=attempts)
            if outcome.status == PREEMPTED:
                return Outcome(PREEMPTED, outcome.exit_code, outcome.reason, attempts)
            if outcome.failed_rank:  # rank 0 may not have lived to say so: the log must name the rank that failed
                events.emit(outcome.failed_rank, level="error", kind="rank_failed", error=outcome.reason)
            attempt = Attempt(outcome.exit_code, report.last_step, outcome.reason)
            attempts.append(attempt)
            if outcome.status == BAD_INPUT or interrupts:
                return Outcome("failed", outcome.exit_code, outcome.reason, attempts)
            if not outcome.restartable(len(attempts) - 1, max_restarts):
                return Outcome("failed", outcome.exit_code, f"failed after {len(attempts)} attempts: {outcome.reason}",
                               attempts)
            events.emit(
                f"attempt {len(attempts)} {outcome.reason}; restarting from the last checkpoint "
                f"({len(attempts)} of {max_restarts} restarts)",
                level="warning", kind="restart", attempt=len(attempts), reason=outcome.reason, step=attempt.last_step,
            )
            print(f"tuneforge: {outcome.reason}; restarting from the last checkpoint", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
