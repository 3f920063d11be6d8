"""Run a recipe in a child process and restart it from its last checkpoint when it dies.

A child that exits 0 succeeded; 75 was preempted after a checkpoint (resumable, not restarted here:
the machine is going away); 2 had bad input (retrying cannot help). Anything else (a crash, SIGKILL
from the out-of-memory killer, a lost node) is restarted up to max_restarts times; the recipe resumes
from the newest verified checkpoint by itself; max_restarts bounds the attempts, so a crash that repeats
at the same step is not retried forever. Stdlib only (no torch): the scheduler can use it too.

Under torchrun the child is torchrun itself: when one rank dies it stops the others and exits 1,
naming the first failure ("Root Cause ... rank: 1 ... exitcode: -9"). The supervisor keeps the tail
of the child's stderr (while passing it through) to report which rank died and how, and reads the
job's events to tell a preemption (every rank checkpointed and exited 75) from a failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.engine.events import EventReporter, read_events
from tuneforge.launch.commands import recipe_environment
from tuneforge.spec.jobdir import EXIT_BAD_INPUT, EXIT_OK, EXIT_PREEMPTED


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


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the out-of-memory killer, or kill -9)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def _last_step(job_dir: Path) -> int:
    steps = [e["data"].get("step", 0) for e in read_events(job_dir) if e["type"] == "metrics"]
    return max(steps, default=0)


def _last_error(job_dir: Path, since: int) -> str | None:
    errors = [e for i, e in enumerate(read_events(job_dir)) if i >= since and e["level"] == "error"]
    return errors[-1]["data"].get("error") if errors else None


def _bad_input(job_dir: Path, since: int) -> bool:
    """The attempt failed on its input (the recipe marked its error not retryable): torchrun turns a
    rank's exit code 2 into 1, the event keeps the difference."""
    errors = [e for i, e in enumerate(read_events(job_dir)) if i >= since and e["level"] == "error"]
    return bool(errors) and errors[-1]["data"].get("retryable") is False


def _last_status(job_dir: Path, since: int) -> str | None:
    """The attempt's own last word: running, preempted (every rank checkpointed and stopped on
    request), failed or succeeded (the summary and the output are written)."""
    statuses = [e["data"].get("status") for i, e in enumerate(read_events(job_dir))
                if i >= since and e["data"].get("kind") == "status"]
    return statuses[-1] if statuses else None


ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\).*?exitcode\s*:\s*(-?\d+)", re.S)


def failed_rank(stderr_tail: str) -> str | None:
    """'rank 1 (local rank 1) killed by SIGKILL ...' from torchrun's failure report, if there is one."""
    match = ROOT_CAUSE.search(stderr_tail)
    if not match:
        return None
    rank, local_rank, code = match.groups()
    return f"rank {rank} (local rank {local_rank}) {describe_exit(int(code))}"


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
            code, stderr_tail = _run_teeing(command, {**os.environ, **recipe_environment(env)}, started)
            if code == EXIT_OK:
                return Outcome("succeeded", code, attempts=attempts)
            status = _last_status(job_dir, events_before)
            if status == "succeeded":
                # Everything was written; a rank died on its way out (a communication library's threads at
                # interpreter exit). The result stands; the log says what happened.
                events.emit(f"the job succeeded, then a process exited abnormally: "
                            f"{failed_rank(stderr_tail) or describe_exit(code)}", level="warning", kind="exit_after_success")
                return Outcome("succeeded", EXIT_OK, attempts=attempts)
            if code == EXIT_PREEMPTED or status == "preempted":
                return Outcome("preempted", EXIT_PREEMPTED, "stopped on request after a checkpoint", attempts)
            if _bad_input(job_dir, events_before):
                code = EXIT_BAD_INPUT
            rank = failed_rank(stderr_tail)
            reason = _last_error(job_dir, events_before) or rank or describe_exit(code)
            if rank and rank not in reason:
                reason = f"{rank}: {reason}"
            if rank:  # rank 0 may not have lived to say so: the log must name the rank that failed
                events.emit(f"{rank}", level="error", kind="rank_failed", error=reason)
            attempt = Attempt(code, _last_step(job_dir), reason)
            attempts.append(attempt)
            if code == EXIT_BAD_INPUT or interrupts:
                return Outcome("failed", code, reason, attempts)
            if len(attempts) > max_restarts:
                return Outcome("failed", code, f"failed after {len(attempts)} attempts: {reason}", attempts)
            events.emit(
                f"attempt {len(attempts)} {reason}; restarting from the last checkpoint "
                f"({len(attempts)} of {max_restarts} restarts)",
                level="warning", kind="restart", attempt=len(attempts), reason=reason, step=attempt.last_step,
            )
            print(f"tuneforge: {reason}; restarting from the last checkpoint", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
